"""Quantised experts (``expert_dtype=``) on the adapted families: Llama 4 (text), Switch, DBRX, JetMoE,
LongCat-Flash.

An adapter's :class:`~swapmoe.adapters.base.SparseExperts` module goes through the same mechanism as
a fused family's experts module (``swapmoe.qexperts``: the slots hold the quantised parts, and each
call dequantises only the chosen slots into a scratch handed to the module's own ``forward``). For
each family, on the tiny float32 checkpoints of ``tests/adapters/tiny.py``:

* at 100%, each format moves the logits by a measured amount, ordered bf16 < int8 < int4 < int2,
  int8 within a few times the bf16 cast's own error, and int8 greedy decoding equals the model's;
* in a bfloat16 model, ``expert_dtype="bf16"`` changes nothing (bit for bit) and int8 moves the logits
  no more than a few times what computing the model in float32 instead does;
* at a budget with swaps (``update_interval=1``), in int8, int4 and int2: the storages the experts
  modules compute from (walked as ``tests/memory.py`` does) are the true quantised bytes, within the
  budget, with as many slots as ``swapmoe info`` promises, and after swapping every slot holds its
  expert's quantisation bit for bit;
* the scratch of the chosen slots (per term and per used slot, with a skipped term) equals a float64
  reference of the family's expert on the dequantised slots;
* the checkpoint-backed store (``host_budget``) quantises as it reads: same generation and swaps;
* ``ondemand`` with int4 experts equals the model with every expert resident in int4;
* ``swapmoe generate --expert-dtype int4`` runs Switch text-to-text at a budget too small for its
  float32 experts.
"""

from __future__ import annotations

import pytest
import torch

import swapmoe
from swapmoe import cli, fused
from swapmoe.baselines import load_policy
from swapmoe.inspect import describe
from swapmoe.qexperts import QuantisedForward
from tests.adapters.test_adapted_families import _logits, _plain, _plain_experts, _reference_expert
from tests.adapters.tiny import ADAPTED, TOP_K
from tests.matrix import greedy, prompt
from tests.memory import bookkeeping_allowance, experts_storages, held_storages

F32 = torch.float32
BF16 = torch.bfloat16

# At 100%, against the unquantised model, on this 16-token prompt, checkpoint seeds 0-2
# (docs/results/quant/adapted-families.json, `benchmarks/adapted_quant_error.py`): in float32, int8's mean
# |logit difference| is 2.9-4.6x that of casting the experts to bf16, its largest at most 0.014 and its
# mean KL at most 3.4e-6 nats; loaded in bfloat16 (as Llama 4 and DBRX are published), int8 moves the
# logits 0.17-1.7x what computing the model in float32 instead does, at most 0.038, KL at most 5.1e-5.
INT8_OVER_BF16 = 6.0
INT8_MAX_LOGIT_TOL = 0.05
INT8_KL_TOL = 1e-4
BF16_INT8_OVER_F32 = 2.5
BF16_INT8_MAX_LOGIT_TOL = 0.1
BF16_INT8_KL_TOL = 2e-4
# budgets of the tiny float32 checkpoints at which each format holds 4 or 5 of the 8 experts per layer
SWAP_BUDGET = {"int8": "15%", "int4": "8%", "int2": "5%"}


def _is_quantised(model) -> bool:
    return all(isinstance(st.layer.experts.__dict__.get("forward"), QuantisedForward) for st in model.swapmoe.layers)


def _kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    p = ref.float().log_softmax(-1)
    return float((p.exp() * (p - out.float().log_softmax(-1))).sum(-1).mean())


@pytest.mark.parametrize("family", ADAPTED)
def test_quantised_experts_at_100_percent_stay_close_to_the_model(checkpoint, family):
    path = checkpoint(family)
    ids = prompt(batch=1, length=16)
    full = swapmoe.load(path, "100%", device="cpu", dtype=F32)
    ref = _logits(full, ids)
    diffs = {}
    for fmt in ("bf16", "int8", "int4", "int2"):
        model = swapmoe.load(path, "100%", device="cpu", dtype=F32, expert_dtype=fmt)
        assert _is_quantised(model)  # every layer computes from its parts, not from float32 weights
        out = _logits(model, ids)
        diffs[fmt] = (out - ref).abs()
        if fmt == "int8":  # the fused int8 kernel (--moe-kernel, CUDA) computes transformers' experts only
            assert all(fused.unsupported(st.layer.experts).startswith("not a transformers fused-experts")
                       for st in model.swapmoe.layers)
            assert diffs[fmt].max() <= INT8_MAX_LOGIT_TOL and _kl(ref, out) <= INT8_KL_TOL
            assert torch.equal(greedy(model, ids), greedy(full, ids))  # decoding through generate
    means = [float(diffs[f].mean()) for f in ("bf16", "int8", "int4", "int2")]
    assert 0 < means[0] < means[1] < means[2] < means[3], means  # fewer bits, more error
    assert means[1] <= INT8_OVER_BF16 * means[0], means


@pytest.mark.parametrize("family", ADAPTED)
def test_quantised_experts_of_a_bfloat16_model_at_100_percent(checkpoint, family):
    path = checkpoint(family)
    ids = prompt(batch=1, length=16)
    ref = _logits(swapmoe.load(path, "100%", device="cpu", dtype=BF16), ids).float()
    same = swapmoe.load(path, "100%", device="cpu", dtype=BF16, expert_dtype="bf16")  # the model's own dtype
    assert not any(isinstance(st.layer.experts.__dict__.get("forward"), QuantisedForward) for st in same.swapmoe.layers)
    assert torch.equal(_logits(same, ids).float(), ref)
    f32 = _logits(swapmoe.load(path, "100%", device="cpu", dtype=F32), ids)
    int8_model = swapmoe.load(path, "100%", device="cpu", dtype=BF16, expert_dtype="int8")
    assert _is_quantised(int8_model)
    int8 = _logits(int8_model, ids).float()
    int4 = _logits(swapmoe.load(path, "100%", device="cpu", dtype=BF16, expert_dtype="int4"), ids).float()
    d8 = (int8 - ref).abs()
    assert 0 < d8.mean() <= BF16_INT8_OVER_F32 * (f32 - ref).abs().mean()
    assert d8.max() <= BF16_INT8_MAX_LOGIT_TOL and _kl(ref, int8) <= BF16_INT8_KL_TOL
    assert (int4 - ref).abs().mean() > d8.mean()


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2"])
@pytest.mark.parametrize("family", ADAPTED)
def test_quantised_slots_hold_true_bytes_and_swaps_copy_every_part(checkpoint, family, fmt):
    path = checkpoint(family)
    budget = SWAP_BUDGET[fmt]
    model = swapmoe.load(path, budget, device="cpu", dtype=F32, expert_dtype=fmt, update_interval=1,
                         swaps_per_update=1)
    ve = model.swapmoe
    assert _is_quantised(model)
    share = float(budget.rstrip("%")) / 100
    slots = [st.num_slots for st in ve.layers]
    assert slots == describe(path).slots_for(share, fmt)  # what `swapmoe info` promises
    assert all(s < st.layer.num_experts for s, st in zip(slots, ve.layers, strict=True))  # swaps needed
    for seed in range(2):  # Switch's encoder layers update between calls: run two requests
        greedy(model, prompt(seed=seed), new=6)
    stats = ve.stats()["total"]
    assert stats["swaps"] > 0
    walked = experts_storages(model).bytes
    layouts = [st.layer.experts.forward.layout for st in ve.layers]
    planned = sum(st.num_slots * lay.expert_bytes() for st, lay in zip(ve.layers, layouts, strict=True))
    assert walked == stats["resident_bytes"] == planned <= stats["budget_bytes"]
    assert held_storages(model).bytes - walked <= bookkeeping_allowance(model)  # no dequantised copy kept
    originals = _plain_experts(_plain(path))  # per MoE block, each expert's weights in swapmoe's order
    assert len(originals) == len(ve.layers)
    for st, experts in zip(ve.layers, originals, strict=True):
        pool, fwd = st.pool, st.layer.experts.forward
        assert fwd.parts is pool.slots  # the module computes from the slots the swapper writes
        for s, e in enumerate(pool.expert_in):
            assert e >= 0 and pool.slot_of[e].item() == s and pool.resident[e].item()
            want = fwd.layout.encode(dict(zip(st.layer.expert_param_names, experts[e], strict=True)))
            for n, t in want.items():
                assert torch.equal(pool.slots[n][s], t), (st.layer.name, s, e, n)
        assert int(pool.resident.sum()) == pool.num_slots


@pytest.mark.parametrize("family", ADAPTED)
def test_scratch_of_chosen_slots_matches_a_float64_reference(checkpoint, family):
    """Per term (T*K <= S) and per used slot (T*K > S), with a skipped term, the quantised experts module
    gives the family's expert computed in float64 on the dequantised slots."""
    model = swapmoe.load(checkpoint(family), "8%", device="cpu", dtype=F32, expert_dtype="int4")
    st = model.swapmoe.layers[0]
    experts, fwd = st.layer.experts, st.layer.experts.forward
    S, K = fwd.num_slots, TOP_K[family]
    assert S == 4
    decoded = fwd.layout.decode(fwd.parts)  # [S, ...] per parameter
    gen = torch.Generator().manual_seed(0)
    for tokens in (1, 2, 9):  # K=1: 1, 2 per term; K=2: 1, 2 per term; 9 tokens: per used slot
        hidden = torch.randn(tokens, 32, generator=gen)
        ids = torch.randint(0, S, (tokens, K), generator=gen)
        ids[0, K - 1] = S  # a skipped term (the runtime's sentinel)
        weights = torch.rand(tokens, K, generator=gen)
        got = experts(hidden, ids, weights)  # [T, H]
        want = torch.zeros(tokens, 32, dtype=torch.float64)
        for t in range(tokens):
            for k in range(K):
                s = int(ids[t, k])
                if s < S:
                    ws = [decoded[n][s] for n in st.layer.expert_param_names]
                    want[t] += _reference_expert(family, ws, hidden[t], float(weights[t, k]))
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
        assert all(experts._parameters[n].numel() == 0 for n in decoded)  # placeholders back


@pytest.mark.parametrize("family", ADAPTED)
def test_checkpoint_backed_store_quantises_as_it_reads(checkpoint, family):
    path = checkpoint(family)
    kw = {"device": "cpu", "dtype": F32, "expert_dtype": "int4", "update_interval": 1, "swaps_per_update": 1}
    held = swapmoe.load(path, "8%", **kw)
    mapped = swapmoe.load(path, "8%", host_budget="1", **kw)  # 1 byte: every layer it can read stays in the files
    assert {la["expert_store"] for la in mapped.swapmoe.stats()["layers"]} == {"host" if family == "dbrx"
                                                                              else "checkpoint"}
    assert torch.equal(greedy(held, prompt(), 8), greedy(mapped, prompt(), 8))
    assert mapped.swapmoe.stats()["total"]["swaps"] == held.swapmoe.stats()["total"]["swaps"] > 0
    for x, y in zip(held.swapmoe.layers, mapped.swapmoe.layers, strict=True):
        host = x.pool.store.tensors  # the host store holds the parts, quantised once at load
        if family == "dbrx":  # held in host memory (above): quantised once at load, as `held`'s
            assert all(torch.equal(y.pool.store.tensors[n], host[n]) for n in host)
            continue
        staged = y.pool.store.stage(3, pin=False)  # read from the files and quantised now
        assert set(staged) == set(host) and all(torch.equal(staged[n], host[n][3]) for n in host)


@pytest.mark.parametrize("family", ADAPTED)
def test_ondemand_with_quantised_experts_equals_the_full_quantised_model(checkpoint, family):
    """Loading each chosen expert's quantised parts on demand computes what every expert resident in int4
    computes: the slots hold exactly the experts' parts, whichever slot an expert lands in."""
    path = checkpoint(family)
    kw = {"device": "cpu", "dtype": F32, "expert_dtype": "int4"}
    full = swapmoe.load(path, "100%", **kw)
    od = load_policy("ondemand", path, "8%", **kw)
    assert all(st.pool.slots[f"{n}.q"].dtype == torch.uint8 for st in od.swapmoe.layers
               for n in st.layer.expert_param_names)  # the slots hold int4 codes (ondemand wraps the forward)
    ids = prompt(batch=1, length=16, seed=6)
    torch.testing.assert_close(_logits(od, ids), _logits(full, ids), rtol=1e-5, atol=1e-5)
    assert torch.equal(greedy(od, ids, 6), greedy(full, ids, 6))
    stats = od.swapmoe.stats()["total"]
    assert stats["swaps"] > 0 and stats["resident_bytes"] <= stats["budget_bytes"]


def test_cli_generate_with_quantised_experts_on_switch(switch_with_tokenizer, capsys):
    """8% of the float32 experts' bytes is below top-1 in every layer; in int4 it holds 4 of 8 per layer."""
    args = ["generate", str(switch_with_tokenizer), "-m", "8%", "--device", "cpu", "-p", "summarize : a b c", "-n", "4"]
    assert cli.main(args) == 2
    assert "below the minimum" in capsys.readouterr().err
    assert cli.main([*args, "--expert-dtype", "int4"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[1].startswith("-> ") and "4 new tokens" in captured.err
    assert captured.err.count(" 4/8 ") == 4  # every MoE layer (2 encoder, 2 decoder) holds 4 int4 experts
