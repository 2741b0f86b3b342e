"""Experts held quantised (``expert_dtype=``): the load, the budget's bytes, swaps, and the outputs."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import swapmoe
from swapmoe.baselines import load_policy, quantized_all_format
from swapmoe.loader import default_model_path
from swapmoe.qexperts import QuantisedForward
from tests.memory import bookkeeping_allowance, experts_storages, held_storages
from tests.tiny_models import VOCAB, make_checkpoint

# int8 at 100% against the bf16 model, on 128 held-out tokens of the reference model (measured on three
# windows: mean |logit difference| 0.017-0.029, mean KL 0.0002-0.0013 nats, largest difference 0.72-1.69,
# top-1 agreement 0.984-0.992; computing the same bf16 weights in float32 instead moves the logits as
# much: mean 0.017-0.023, largest 1.26-1.34). int4 moves them ~5x more (mean 0.11-0.14).
INT8_MEAN_LOGIT_TOL = 0.05
INT8_MAX_LOGIT_TOL = 2.5
INT8_KL_TOL = 0.005


@pytest.fixture(scope="module")
def heldout_ids():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_path())
    text = (default_model_path().parents[1] / "data" / "heldout" / "all.txt").read_text(encoding="utf-8")
    return tok(text[20000:24000], return_tensors="pt").input_ids[:, :128]


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits.float()


def test_bf16_at_100_percent_is_plain_transformers_bit_for_bit(heldout_ids):
    plain = AutoModelForCausalLM.from_pretrained(default_model_path()).eval()
    assert plain.dtype == torch.bfloat16
    model = swapmoe.load(None, "100%", expert_dtype="bf16")  # the model's own dtype: nothing changes
    assert not any(isinstance(st.layer.experts.__dict__.get("forward"), QuantisedForward)
                   for st in model.swapmoe.layers)
    assert torch.equal(_logits(model, heldout_ids), _logits(plain, heldout_ids))


def test_int8_at_100_percent_stays_within_the_stated_tolerance(heldout_ids):
    ref = _logits(swapmoe.load(None, "100%"), heldout_ids)
    int8 = _logits(swapmoe.load(None, "100%", expert_dtype="int8"), heldout_ids)
    int4 = _logits(swapmoe.load(None, "100%", expert_dtype="int4"), heldout_ids)
    diff = (int8 - ref).abs()
    p = ref.log_softmax(-1)
    kl = (p.exp() * (p - int8.log_softmax(-1))).sum(-1).mean()
    assert 0 < diff.mean() <= INT8_MEAN_LOGIT_TOL and diff.max() <= INT8_MAX_LOGIT_TOL and kl <= INT8_KL_TOL
    assert (int4 - ref).abs().mean() > 2 * diff.mean()  # fewer bits, more error: the formats differ


# how many times the bf16 experts the same bytes hold, at least (int8 1.94x, int4 3.56x, int3 4.57x, int2 6.4x,
# less the round-robin's remainder)
MORE_EXPERTS = {"int8": 1.8, "int4": 3.4, "int3": 4.4, "int2": 6.0}


@pytest.mark.parametrize(("fmt", "budget"), [("int8", "50%"), ("int4", "25%"), ("int8", "100%"), ("int3", "12.5%"),
                                             ("int2", "12.5%")])
def test_budget_bytes_are_the_measured_bytes_of_the_quantised_slots(heldout_ids, fmt, budget):
    plain = swapmoe.load(None, budget)
    model = swapmoe.load(None, budget, expert_dtype=fmt)
    _logits(model, heldout_ids[:, :32])  # a forward: its scratch must not outlive it
    stats = model.swapmoe.stats()["total"]
    walked = experts_storages(model).bytes
    layouts = [st.layer.experts.forward.layout for st in model.swapmoe.layers]
    planned = sum(st.num_slots * lay.expert_bytes() for st, lay in zip(model.swapmoe.layers, layouts, strict=True))
    assert walked == stats["resident_bytes"] == planned <= stats["budget_bytes"]
    assert held_storages(model).bytes - walked <= bookkeeping_allowance(model)  # no dequantised copy kept
    assert stats["slots"] > MORE_EXPERTS[fmt] * plain.swapmoe.stats()["total"]["slots"] or \
        stats["slots"] == 8 * 16  # the same bytes hold more experts in fewer bits, up to all


@pytest.mark.parametrize(("fmt", "budget"), [("int4", "25%"), ("int2", "12.5%")])
def test_swaps_keep_maps_and_quantised_slots_consistent(heldout_ids, fmt, budget):
    full = AutoModelForCausalLM.from_pretrained(default_model_path()).eval()
    model = swapmoe.load(None, budget, expert_dtype=fmt, update_interval=4, swaps_per_update=2)
    _logits(model, heldout_ids)
    with torch.inference_mode():
        model.generate(heldout_ids[:, :8], max_new_tokens=24, do_sample=False)
    assert model.swapmoe.stats()["total"]["swaps"] > 0
    blocks = [m for m in full.modules() if type(m).__name__.endswith("Experts")]
    for st, original in zip(model.swapmoe.layers, blocks, strict=True):
        pool, fwd = st.pool, st.layer.experts.forward
        assert fwd.parts is pool.slots  # the kernel reads the slots the swapper writes
        for s, e in enumerate(pool.expert_in):
            assert e >= 0 and pool.slot_of[e].item() == s and pool.resident[e].item()
            want = fwd.layout.encode({n: getattr(original, n).detach()[e] for n in st.layer.expert_param_names})
            for n, t in want.items():
                assert torch.equal(pool.slots[n][s], t), (st.layer.name, s, e, n)
        assert int(pool.resident.sum()) == pool.num_slots


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("quant") / "qwen3-moe")


@pytest.mark.parametrize("fmt", ["int8", "int4", "int3", "int2"])
def test_scratch_of_chosen_slots_equals_all_slots_dequantised(tiny, fmt):
    """Per term (T*K <= S) and per used slot (T*K > S), with a skipped term: the same as computing from
    every slot dequantised (what the scratch avoids holding)."""
    budget = {"int8": "20%", "int4": "12%", "int3": "10%", "int2": "7%"}[fmt]
    model = swapmoe.load(tiny, budget, expert_dtype=fmt)  # 6 of 8 slots
    st = model.swapmoe.layers[0]
    experts, fwd = st.layer.experts, st.layer.experts.forward
    S = fwd.num_slots
    assert S == 6
    everything = fwd.layout.decode(fwd.parts)  # [S, ...] the materialised reference
    gen = torch.Generator().manual_seed(0)
    for tokens in (1, 2, 9):  # 2 and 1 tokens: per term; 9: per used slot
        hidden = torch.randn(tokens, 32, generator=gen)
        ids = torch.randint(0, S, (tokens, 2), generator=gen)
        ids[0, 1] = S  # a skipped term (the runtime's sentinel)
        weights = torch.rand(tokens, 2, generator=gen)
        weights[0, 1] = 0.0
        got = experts(hidden, ids, weights)
        saved = {n: experts._parameters[n] for n in everything}
        try:
            for n, w in everything.items():
                experts._parameters[n] = w
            want = type(experts).forward(experts, hidden, ids, weights)
        finally:
            experts._parameters.update(saved)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert all(experts._parameters[n].numel() == 0 for n in everything)  # placeholders back


@pytest.mark.parametrize(("fmt", "budget"), [("int8", "20%"), ("int3", "10%")])  # 6 of 8 slots
def test_checkpoint_backed_store_quantises_each_expert_as_it_is_read(tiny, fmt, budget):
    kw = {"update_interval": 1, "swaps_per_update": 2, "expert_dtype": fmt}
    held = swapmoe.load(tiny, budget, **kw)
    mapped = swapmoe.load(tiny, budget, host_budget=1, **kw)  # 1 byte: every layer stays in the files
    assert {la["expert_store"] for la in mapped.swapmoe.stats()["layers"]} == {"checkpoint"}
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = held.generate(ids, max_new_tokens=12, do_sample=False)
        b = mapped.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b)
    assert mapped.swapmoe.stats()["total"]["swaps"] == held.swapmoe.stats()["total"]["swaps"] > 0
    for x, y in zip(held.swapmoe.layers, mapped.swapmoe.layers, strict=True):
        host = x.pool.store.tensors  # the host store holds the parts, quantised once at load
        assert host["gate_up_proj.q"].dtype == {"int8": torch.int8, "int3": torch.uint8}[fmt]
        staged = y.pool.store.stage(3, pin=False)
        assert set(staged) == set(host)
        assert all(torch.equal(staged[n], host[n][3]) for n in host)
        assert y.pool.store.expert_bytes() == x.pool.store.expert_bytes() == x.layer.experts.forward.layout.expert_bytes()


def test_quantized_all_picks_the_least_lossy_format_that_holds_every_expert(tiny, caplog):
    # the tiny model is float32: bf16 holds all at 50%, int8 (26.7%) at 30%, int4 (16%) at 20%, int3 (12.8%)
    # at 13%, int2 (9.7%) at 10%
    budgets = ("100%", "60%", "30%", "20%", "13%", "10%")
    assert [quantized_all_format(tiny, b) for b in budgets] == [None, "bf16", "int8", "int4", "int3", "int2"]
    model = load_policy("quantized-all", tiny, "30%")
    stats = model.swapmoe.stats()
    assert all(la["slots"] == la["num_experts"] for la in stats["layers"])
    assert stats["total"]["resident_bytes"] <= stats["total"]["budget_bytes"]
    assert model.swapmoe.config.swaps_per_update == 0
    with caplog.at_level(logging.WARNING):
        part = load_policy("quantized-all", tiny, "8%")  # even int2 does not hold them all
    assert "even int2 experts" in caplog.text
    assert part.swapmoe.config.swaps_per_update == 0
    assert part.swapmoe.stats()["total"]["slots"] < 2 * 8 * 2 * 1.0 + 16


def test_info_and_cli(tiny, capsys):
    from swapmoe.cli import main
    from swapmoe.inspect import describe

    info = describe(tiny)
    assert info.slots_for(0.3) == [2, 2]  # float32: top-k only
    assert info.slots_for(0.3, "int8") == [8, 8] and info.slots_for(0.2, "int4") == [8, 8]
    assert info.slots_for(0.13, "int3") == [8, 8] and info.slots_for(0.1, "int2") == [8, 8]
    assert info.slots_for(0.1, "int3") == [6, 6]  # 1184 bytes an expert: 7.8 of them in 10%
    assert main(["info", str(tiny)]) == 0
    err = capsys.readouterr().err
    assert "--expert-dtype int4:" in err and "--expert-dtype int3:" in err and "--expert-dtype int2:" in err


def test_parameters_held_in_memory_by_a_checkpoint_store_are_held_quantised(tiny):
    """A parameter without a verified checkpoint recipe stays in memory: quantised once, like the host store."""
    from swapmoe.mmap_store import discover, weight_files
    from swapmoe.quant import ExpertLayout

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    experts = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    name = next(n for n, m in model.named_modules() if m is experts).rsplit(".", 1)[0]
    params = {n: p.detach() for n, p in experts.named_parameters()}
    found = discover(name, params, weight_files(sorted(tiny.glob("*.safetensors"))))
    assert found is not None and set(found.recipes) == {"gate_up_proj", "down_proj"}
    layout = ExpertLayout.of(params, "int4")
    store = type(found)({"gate_up_proj": found.recipes["gate_up_proj"]}, found.files, found.shapes, found.dtypes,
                        held={"down_proj": params["down_proj"]}, layout=layout)
    assert store.held == {} and store.held_parts["down_proj.q"].dtype == torch.uint8
    want = layout.encode({n: p[5] for n, p in params.items()})
    got = store.stage(5, pin=False)
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_bf16_experts_of_a_float32_model_are_a_cast(tiny):
    f32 = swapmoe.load(tiny, "25%")
    bf16 = swapmoe.load(tiny, "25%", expert_dtype="bf16")
    assert bf16.swapmoe.stats()["total"]["slots"] == 2 * f32.swapmoe.stats()["total"]["slots"]
    assert bf16.swapmoe.layers[0].pool.slots["gate_up_proj.q"].dtype == torch.bfloat16
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    full = _logits(swapmoe.load(tiny, "100%"), ids)
    cast = _logits(swapmoe.load(tiny, "100%", expert_dtype="bf16"), ids)
    assert 0 < (cast - full).abs().max() < 1e-2
