"""The one decode path (swapmoe.engine.decoder) on the CPU: the static-cache path that the CUDA graph
replays, split as a replay splits it, against eager forwards with a dynamic cache.

The CUDA graph itself is tested in tests/test_cuda.py (run on the GPU machine)."""

from __future__ import annotations

import pytest
import torch

import swapmoe
from swapmoe.engine import SamplingParams, generate
from swapmoe.engine.decoder import Decoder, graph_blocker
from swapmoe.engine.hf_generate import install

PROMPT = [5, 17, 42, 9, 33, 12, 7, 61]


def _greedy(dec: Decoder, prompt: list[int], new: int) -> tuple[list[int], list[torch.Tensor]]:
    logits = dec.prefill(prompt, max_new_tokens=new)
    tokens, rows = [], []
    for _ in range(new):
        rows.append(dec.read_logits(logits))
        token = int(rows[-1].argmax())
        tokens.append(token)
        logits = dec.step(token)
    return tokens, rows


def test_cpu_has_no_graph_and_says_why(engine_checkpoint):
    model = swapmoe.load(engine_checkpoint, "50%", device="cpu", dtype=torch.bfloat16)
    assert graph_blocker(model) == "not on a CUDA device"
    assert Decoder(model).mode == "dynamic"
    with pytest.raises(ValueError, match="cannot be captured in a CUDA graph: not on a CUDA device"):
        Decoder(model, "graph")


def test_the_reason_a_model_decodes_eagerly_is_the_models_own(engine_checkpoint, tmp_path):
    """graph_blocker names what keeps a model's step out of a graph on any device (the log line a user
    reads on a GPU), before the device itself."""
    from swapmoe.baselines import load_policy
    from tests.adapters.tiny import make_checkpoint as make_adapted

    def reason(model):
        return graph_blocker(model) or ""

    assert reason(swapmoe.load(engine_checkpoint, "50%", device="cpu", dtype=torch.float32)).startswith(
        "grouped_mm on non-bfloat16")
    assert reason(swapmoe.load(engine_checkpoint, "50%", device="cpu", dtype=torch.bfloat16,
                               experts_implementation="eager")).startswith("the 'eager' experts kernel")
    assert reason(load_policy("ondemand", engine_checkpoint, "50%", device="cpu",
                              dtype=torch.bfloat16)).startswith("on-demand loading")
    # quantised experts are captured too (their decode path gathers per term: fixed shapes, no host read)
    assert reason(swapmoe.load(engine_checkpoint, "50%", device="cpu", dtype=torch.bfloat16,
                               expert_dtype="int8")) == "not on a CUDA device"
    llama4 = make_adapted("llama4_text", tmp_path / "llama4")
    assert reason(swapmoe.load(llama4, "50%", device="cpu", dtype=torch.bfloat16)).startswith("an adapted family")


def test_static_split_steps_equal_eager_steps_while_swapping(engine_checkpoint):
    """The graph path's bookkeeping (scheduler before each step, hooks doing in-graph work only) routes,
    swaps and counts exactly as eager forwards do, with swaps every 2 tokens."""
    kw = dict(device="cpu", update_interval=2, swaps_per_update=1)
    runs = {}
    for mode in ("dynamic", "static"):
        model = swapmoe.load(engine_checkpoint, "50%", **kw)
        tokens, rows = _greedy(Decoder(model, mode), PROMPT, 40)
        runs[mode] = (tokens, rows, model.swapmoe.stats()["total"], model.swapmoe.resident_sets())
        for st in model.swapmoe.layers:  # the device maps agree with the host's record of each slot
            pool = st.pool
            assert pool.resident.nonzero().flatten().tolist() == sorted(pool.expert_in)
            assert [pool.slot_of[e].item() for e in pool.expert_in] == list(range(pool.num_slots))
            assert (pool.slot_of >= 0).sum().item() == pool.num_slots
    (t_dyn, r_dyn, s_dyn, sets_dyn), (t_sta, r_sta, s_sta, sets_sta) = runs["dynamic"], runs["static"]
    assert s_dyn["swaps"] > 0, "the schedule must swap for this test to mean anything"
    assert t_sta == t_dyn
    for a, b in zip(r_sta, r_dyn, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for key in ("swaps", "bytes_copied", "hits", "lookups"):
        assert s_sta[key] == s_dyn[key], key
    assert sets_sta == sets_dyn


def test_static_cache_is_reused_in_place_and_grows_when_a_sequence_outruns_it(engine_checkpoint):
    model = swapmoe.load(engine_checkpoint, "100%", device="cpu")
    static, dynamic = Decoder(model, "static", min_capacity=32), Decoder(model, "dynamic")
    first, _ = _greedy(static, PROMPT, 8)
    cache = static.cache
    again, _ = _greedy(static, PROMPT, 8)
    assert static.cache is cache and again == first  # a new request resets the same cache
    # prefill sized for 1 new token, then decode past the capacity: re-prefilled into a larger cache
    long_prompt = (PROMPT * 4)[:30]
    logits = static.prefill(long_prompt, max_new_tokens=1)
    ref = dynamic.prefill(long_prompt)
    assert static.capacity == 32
    for _ in range(6):
        token = int(static.read_logits(logits).argmax())
        assert token == int(ref.argmax())
        logits, ref = static.step(token), dynamic.step(token)
    assert static.capacity == 64 and static.cache is not cache
    torch.testing.assert_close(static.read_logits(logits), dynamic.read_logits(ref), rtol=1e-4, atol=1e-4)


def test_engine_generation_is_the_same_through_either_cache(engine_checkpoint, tokenizer):
    model = swapmoe.load(engine_checkpoint, "50%", device="cpu", swaps_per_update=0)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    model.swapmoe_decode_mode = "dynamic"
    eager = generate(model, tokenizer, PROMPT, params)
    model.swapmoe_decode_mode = "static"
    static = generate(model, tokenizer, PROMPT, params)
    assert model.__dict__["_swapmoe_decoder"].mode == "static"
    assert static.token_ids == eager.token_ids and len(eager.token_ids) > 0


@pytest.mark.parametrize("budget", ["100%", "50%"])
def test_model_generate_through_the_decoder_equals_plain_generate(engine_checkpoint, budget):
    """model.generate keeps transformers' semantics when its decode steps go through the decoder."""
    plain = swapmoe.load(engine_checkpoint, budget, device="cpu", swaps_per_update=0)
    routed = swapmoe.load(engine_checkpoint, budget, device="cpu", swaps_per_update=0)
    dec = install(routed, "static")
    ids = torch.tensor([PROMPT])
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    out_plain = plain.generate(ids, **kw)
    out_routed = routed.generate(ids, **kw)
    assert torch.equal(out_routed, out_plain)
    assert dec.cache is not None and len(dec.history) == len(PROMPT) + 19  # the last token is not fed
    assert routed.swapmoe.stats()["total"]["lookups"] == plain.swapmoe.stats()["total"]["lookups"]
    # padding, batches and beams run as plain transformers (the static path derives positions itself)
    two = torch.tensor([PROMPT, PROMPT])
    assert torch.equal(routed.generate(two, **kw), plain.generate(two, **kw))
    # so do calls that want what a replay does not return (hidden states), or no cache at all
    seen = len(dec.history)
    out = routed.generate(ids, **kw, output_hidden_states=True, return_dict_in_generate=True)
    assert out.hidden_states is not None and torch.equal(out.sequences, out_plain)
    assert torch.equal(routed.generate(ids, **kw, use_cache=False), out_plain)
    assert len(dec.history) == seen  # neither went through the decoder
    # a generation config given positionally goes through the decoder too; a cache that turns out too
    # short (here: the smallest capacity forced to 16) is regrown, and transformers follows the new one
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=40, do_sample=False, pad_token_id=0)
    dec.min_capacity, dec.cache = 16, None
    assert torch.equal(routed.generate(ids, config), plain.generate(ids, config))
    assert dec.capacity == 64 and len(dec.history) == len(PROMPT) + 39


@pytest.mark.parametrize("budget", ["100%", "50%"])
def test_sliding_window_models_decode_the_same_through_the_static_cache(tmp_path, budget):
    """gpt-oss alternates sliding-window (4 tokens here) and full attention layers; the graph path's
    static cache holds full-length layers and leaves the window to the mask. 30 tokens run far past
    the window."""
    from tests.tiny_models import make_checkpoint

    path = make_checkpoint("gpt_oss", tmp_path / "gpt-oss", layout="fused")
    model = swapmoe.load(path, budget, device="cpu", swaps_per_update=0)
    prompt = [3, 14, 15, 9, 2, 6, 5, 35, 8, 9, 7, 9]
    static = Decoder(model, "static", min_capacity=16)
    static_tokens, static_rows = _greedy(static, prompt, 30)
    assert not any(layer.is_sliding for layer in static.cache.layers)  # no host-side length to freeze
    dynamic_tokens, dynamic_rows = _greedy(Decoder(model, "dynamic"), prompt, 30)
    assert static_tokens == dynamic_tokens
    for a, b in zip(static_rows, dynamic_rows, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_eager_attention_on_a_release_whose_mask_copies_a_host_scalar_is_not_captured(tmp_path, monkeypatch):
    """transformers up to 5.20 builds the eager-attention mask from ``torch.tensor(0.0, device=...)``, a
    copy from pageable memory that a CUDA graph capture refuses (seen on the H200 with gpt-oss on 5.17):
    graph_blocker says so instead of a failed capture; 5.21 on builds it on the device."""
    from transformers import masking_utils

    from swapmoe.compat import eager_mask_is_capturable
    from tests.tiny_models import make_checkpoint

    model = swapmoe.load(make_checkpoint("gpt_oss", tmp_path / "gpt-oss", layout="fused"), "50%", device="cpu",
                         dtype=torch.bfloat16)
    assert model.config._attn_implementation == "eager"
    assert eager_mask_is_capturable()  # the locked release (5.24) builds its mask on the device
    assert graph_blocker(model) == "not on a CUDA device"

    def old_eager_mask(mask, dtype=torch.float32):  # 5.17's way of making the zero
        return torch.where(mask, torch.tensor(0.0, device=mask.device, dtype=dtype), torch.finfo(dtype).min)

    monkeypatch.setattr(masking_utils, "eager_mask", old_eager_mask)
    assert not eager_mask_is_capturable()
    assert graph_blocker(model).startswith("eager attention on transformers < 5.21")


def test_a_router_step_that_fails_to_compile_is_routed_uncompiled_once_and_for_all(engine_checkpoint, caplog):
    """Inductor can fail on a machine (the H200 once wrote a wrapper it could not import): the decoder
    then routes through the uncompiled step, with one warning, and decodes what an unfused decoder
    decodes, importance and hits included (the failed compile ran nothing)."""
    calls = []

    def broken_compile(*args, **kwargs):
        calls.append(1)
        raise torch._dynamo.exc.TorchDynamoException("Failed to import /tmp/x.py\nSyntaxError: ...")

    runs = {}
    for name in ("unfused", "failing"):
        model = swapmoe.load(engine_checkpoint, "50%", device="cpu", update_interval=2, swaps_per_update=1)
        dec = Decoder(model, "static", fuse_router=False)
        if name == "failing":
            dec.fused = broken_compile
        with caplog.at_level("WARNING", logger="swapmoe.runtime"):
            tokens, rows = _greedy(dec, PROMPT, 12)
        importance = [st.importance.clone() for st in model.swapmoe.layers if st.pool is not None]
        runs[name] = (tokens, rows, model.swapmoe.stats()["total"], importance)
        assert dec.fused is None and model.swapmoe.fused is None
    assert calls == [1]  # tried once, not per layer or per token
    assert [r.getMessage() for r in caplog.records].count(
        "could not compile the router step (Failed to import /tmp/x.py); routing with the uncompiled step") == 1
    (t0, r0, s0, i0), (t1, r1, s1, i1) = runs["unfused"], runs["failing"]
    assert t1 == t0 and s1 == s0
    for a, b in zip(r1 + i1, r0 + i0, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_failure_message_is_reduced_to_its_first_line_or_its_type():
    """What the compile and capture fallbacks log: a compile error without a message must not raise
    inside the handler (an empty message has no first line)."""
    from swapmoe.errors import first_line

    assert first_line(RuntimeError("  Failed to import x.py\nSyntaxError: ...")) == "Failed to import x.py"
    assert first_line(torch._dynamo.exc.TorchDynamoException()) == "TorchDynamoException"
    assert first_line(ValueError("\n")) == "ValueError"
