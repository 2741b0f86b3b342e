"""The decode step compiled by inductor (Decoder(compile_step=True)) on the CPU, in static mode: the
graph path's split (scheduler on the host, then a forward whose hooks do in-graph work only) with the
forward compiled, against the same split uncompiled. Inductor compiles C++ here (~15 s per model).

The compiled step inside a CUDA graph is tested in tests/test_cuda.py (run on the GPU machine)."""

from __future__ import annotations

import pytest
import torch

import swapmoe
from swapmoe.engine.decoder import Decoder

# Measured on these tiny float32 models: at most 2.4e-5 between compiled and uncompiled logits over 20
# steps (inductor reorders reductions of RMSNorm and softmax); a routing or map error moves them by >0.1.
TOL = dict(rtol=1e-4, atol=1e-4)
FEED = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(0)).tolist()
STEPS = 20


def _teacher_forced(dec: Decoder, steps: int = STEPS) -> list[torch.Tensor]:
    """Prefill 8 tokens, then ``steps`` steps on a fixed token stream: the logits of each."""
    rows = [dec.prefill(FEED[:8], max_new_tokens=32).clone()]
    for t in FEED[8:8 + steps]:
        rows.append(dec.step(t).clone())
    return rows


def _assert_maps_match_host_record(model) -> None:
    for st in model.swapmoe.layers:
        pool = st.pool
        assert pool.resident.nonzero().flatten().tolist() == sorted(pool.expert_in)
        assert [pool.slot_of[e].item() for e in pool.expert_in] == list(range(pool.num_slots))
        assert (pool.slot_of >= 0).sum().item() == pool.num_slots


def test_compiled_step_equals_uncompiled_for_plain_transformers(engine_checkpoint):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(engine_checkpoint).eval()
    ref = _teacher_forced(Decoder(model, "static"))
    dec = Decoder(model, "static", compile_step=True)
    got = _teacher_forced(dec)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert dec.compiled.compiles == 1  # one graph for 20 steps: no recompilation per token


def test_compiled_step_routes_and_swaps_as_uncompiled_at_half_budget(engine_checkpoint):
    """swapmoe at 50%, an update every 2 tokens: the router hooks traced into the compiled step read the
    maps the scheduler flips between steps (never a stale copy), so logits, swaps, hits and resident
    sets equal the uncompiled split's."""
    kw = dict(device="cpu", update_interval=2, swaps_per_update=1)
    runs = {}
    for compiled in (False, True):
        model = swapmoe.load(engine_checkpoint, "50%", **kw)
        dec = Decoder(model, "static", compile_step=compiled)
        rows = _teacher_forced(dec)
        _assert_maps_match_host_record(model)
        runs[compiled] = (rows, model.swapmoe.stats()["total"], model.swapmoe.resident_sets(), dec)
    (ref, s_ref, sets_ref, _), (got, s_got, sets_got, dec) = runs[False], runs[True]
    assert s_ref["swaps"] >= 5, "the schedule must swap for this test to mean anything"
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    for key in ("swaps", "bytes_copied", "hits", "lookups"):
        assert s_got[key] == s_ref[key], key
    assert sets_got == sets_ref
    assert dec.compiled.compiles == 1


def test_bfloat16_compiled_step_is_bit_identical_to_the_uncompiled_one_while_swapping(engine_checkpoint):
    """In bfloat16 the compiled step rounds where the eager step rounds (emulated precision casts), so
    its logits, and therefore its routing and swaps, are the uncompiled step's bit for bit. Without the
    emulated casts they drifted by up to 0.35 on this model in plain transformers."""
    kw = dict(device="cpu", dtype=torch.bfloat16, update_interval=2, swaps_per_update=1)
    runs = {}
    for compiled in (False, True):
        model = swapmoe.load(engine_checkpoint, "50%", **kw)
        rows = _teacher_forced(Decoder(model, "static", compile_step=compiled), steps=12)
        _assert_maps_match_host_record(model)
        runs[compiled] = (rows, model.swapmoe.stats()["total"], model.swapmoe.resident_sets())
    (ref, s_ref, sets_ref), (got, s_got, sets_got) = runs[False], runs[True]
    assert s_ref["swaps"] >= 3, "the schedule must swap for this test to mean anything"
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)
    assert (s_got["swaps"], s_got["hits"], sets_got) == (s_ref["swaps"], s_ref["hits"], sets_ref)


def test_compile_count_stays_fixed_across_steps_and_requests(engine_checkpoint):
    """Compiles happen at the first step and when the cache's capacity changes, never per token, per
    swap or per request (a new request resets the cache in place). Checked with the decoder's own count
    and with dynamo's recompile counter."""
    from torch._dynamo.utils import counters

    model = swapmoe.load(engine_checkpoint, "50%", device="cpu", update_interval=1, swaps_per_update=1)
    dec = Decoder(model, "static", min_capacity=32, compile_step=True)
    recompiles = sum(counters["recompiles"].values())
    dec.prefill(FEED[:8], max_new_tokens=STEPS)
    for t in FEED[8:8 + STEPS]:
        dec.step(t)
    assert dec.compiled.compiles == 1 and model.swapmoe.stats()["total"]["swaps"] > 0
    dec.prefill(FEED[3:9], max_new_tokens=STEPS)  # a second request, same cache
    for t in FEED[:STEPS]:
        dec.step(t)
    assert dec.compiled.compiles == 1 and dec.capacity == 32
    assert sum(counters["recompiles"].values()) == recompiles
    # a longer request needs a larger cache: one more compile (the cache tensors' shapes changed)
    dec.prefill(FEED[:30], max_new_tokens=8)
    dec.step(FEED[30])
    dec.step(FEED[31])
    assert dec.capacity == 64 and dec.compiled.compiles == 2


def test_compile_step_refuses_what_it_cannot_compile(engine_checkpoint):
    model = swapmoe.load(engine_checkpoint, "50%", device="cpu")
    with pytest.raises(ValueError, match="compile_step compiles the static-cache decode step"):
        Decoder(model, "dynamic", compile_step=True)
    with pytest.raises(ValueError, match="compile mode must be one of"):
        Decoder(model, "static", compile_step=True, compile_mode="reduce-overhead")


def test_load_with_compile_step_compiles_the_engines_static_decoder(engine_checkpoint, tokenizer):
    """swapmoe.load(compile_step=True) reaches the decoder every command decodes through (decoder_for),
    and generation through the engine is unchanged by it; eager (dynamic) decoding stays uncompiled."""
    from swapmoe.engine import SamplingParams, generate

    params = SamplingParams(max_tokens=12, temperature=0.0)
    plain = swapmoe.load(engine_checkpoint, "50%", device="cpu", swaps_per_update=0)
    plain.swapmoe_decode_mode = "static"
    compiled = swapmoe.load(engine_checkpoint, "50%", device="cpu", swaps_per_update=0, compile_step=True)
    compiled.swapmoe_decode_mode = "static"
    ref = generate(plain, tokenizer, FEED[:8], params)
    got = generate(compiled, tokenizer, FEED[:8], params)
    dec = compiled.__dict__["_swapmoe_decoder"]
    assert dec.compiled is not None and dec.compiled.compiles == 1
    assert got.token_ids == ref.token_ids and len(got.token_ids) > 0
    compiled.swapmoe_decode_mode = "dynamic"
    generate(compiled, tokenizer, FEED[:8], params)
    assert compiled.__dict__["_swapmoe_decoder"].compiled is None


def test_compile_step_on_a_cpu_decodes_on_the_static_cache_compiled(engine_checkpoint, tokenizer):
    """A CPU has no graph to capture, but `--compile-step` still compiles the step: the engine decodes on
    the static cache with the compiled step (not the eager dynamic path, where it would do nothing),
    and generates what the uncompiled eager decoder generates."""
    from swapmoe.engine import SamplingParams, generate

    params = SamplingParams(max_tokens=12, temperature=0.0)
    eager = swapmoe.load(engine_checkpoint, "50%", device="cpu", update_interval=2)
    compiled = swapmoe.load(engine_checkpoint, "50%", device="cpu", update_interval=2, compile_step=True)
    ref = generate(eager, tokenizer, FEED[:8], params)
    got = generate(compiled, tokenizer, FEED[:8], params)
    assert eager.__dict__["_swapmoe_decoder"].mode == "dynamic"
    dec = compiled.__dict__["_swapmoe_decoder"]
    assert dec.mode == "static" and dec.compiled is not None and dec.compiled.compiles == 1
    assert got.token_ids == ref.token_ids and len(got.token_ids) > 0
    assert compiled.swapmoe.stats()["total"]["swaps"] == eager.swapmoe.stats()["total"]["swaps"] > 0


def test_a_step_dynamo_cannot_trace_falls_back_to_the_uncompiled_step(engine_checkpoint, caplog):
    """A model whose step breaks the graph (here a hook branching on a device value) is decoded with the
    uncompiled step, with a warning naming the reason, rather than failing the request."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(engine_checkpoint).eval()
    model.lm_head.register_forward_hook(lambda mod, args, out: out * 2 if bool(out.abs().sum() > 1e30) else None)
    ref = _teacher_forced(Decoder(model, "static"), steps=4)
    dec = Decoder(model, "static", compile_step=True)
    with caplog.at_level("WARNING", logger="swapmoe.engine.decoder"):
        got = _teacher_forced(dec, steps=4)
    assert dec.compiled is None and "could not compile the decode step" in caplog.text
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)
