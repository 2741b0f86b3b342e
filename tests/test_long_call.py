"""A call that spans several update intervals is owed that many updates' swaps (through the public API).

docs/evaluation.md credits this rule with perplexity 164.4 -> 116.4 on the reference model: an
evaluation window or a prefill of T tokens must not be planned as if it were one interval. Shown on a
tiny checkpoint whose routers choose the same two experts for every token, with neither resident at
first: after one long call, the next call must find both of them resident before it is routed.
"""

from __future__ import annotations

import pytest
import torch

import swapmoe
from swapmoe.families import find_moe_layers
from tests.threads import single_torch_thread
from tests.tiny_models import make_checkpoint

PREFERRED = (5, 6)  # outside the initial resident set {0, 1, 2, 3} ("first", 4 of 8 slots)


def _prefer(model) -> None:
    """Every router strongly prefers PREFERRED for every token (dimension 0 carries the skew)."""
    model.get_input_embeddings().weight[:, 0] = 8.0
    for la in find_moe_layers(model):
        la.router.weight[:, 0] = -4.0
        la.router.weight[list(PREFERRED), 0] = 4.0


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    with single_torch_thread():
        yield make_checkpoint("mixtral", tmp_path_factory.mktemp("skewed"), layout="fused", edit=_prefer)


def test_a_long_call_is_owed_one_update_per_interval_it_spans(skewed):
    model = swapmoe.load(skewed, "50%", device="cpu", dtype=torch.float32, initial="first",
                         update_interval=2, swaps_per_update=1)
    ve = model.swapmoe
    ids = torch.arange(2, 18).view(1, 16)
    with torch.no_grad():
        model(ids)  # 16 tokens: 8 intervals' worth of updates are owed to the next call
    first = ve.stats()["total"]
    assert first["hit_rate"] == 0.0 and first["swaps"] == 0  # nothing preferred was resident, no update yet
    ve.reset_stats()
    with torch.no_grad():
        model(torch.tensor([[3, 4]]))
    second = ve.stats()
    layers = len(ve.layers)
    # both preferred experts came in before this call was routed: 2 swaps per layer in one update,
    # which swaps_per_update=1 allows only because 8 intervals were owed
    assert [la["swaps"] for la in second["layers"]] == [len(PREFERRED)] * layers
    assert second["total"]["hit_rate"] == 1.0
    assert all(set(PREFERRED) <= set(s) for s in ve.resident_sets())


def test_a_short_call_gets_one_interval_of_swaps(skewed):
    """The counterpart: a call of one interval's tokens is owed one update, i.e. swaps_per_update."""
    model = swapmoe.load(skewed, "50%", device="cpu", dtype=torch.float32, initial="first",
                         update_interval=2, swaps_per_update=1)
    with torch.no_grad():
        model(torch.tensor([[2, 3]]))
        model(torch.tensor([[4, 5]]))
    assert [la["swaps"] for la in model.swapmoe.stats()["layers"]] == [1] * len(model.swapmoe.layers)


def test_restore_brings_resident_sets_importance_and_counters_back():
    """snapshot() then restore(): after a run that moved experts (one of them only to another slot),
    every layer holds its snapshot's experts, slot for slot, with matching maps, scores and counters."""
    import tempfile
    from pathlib import Path

    import swapmoe
    from tests.tiny_models import VOCAB, make_checkpoint

    with tempfile.TemporaryDirectory() as d:
        ckpt = make_checkpoint("qwen3_moe", Path(d) / "q", layout="legacy")
        model = swapmoe.load(ckpt, "50%", device="cpu", update_interval=1, swaps_per_update=2)
        runtime = model.swapmoe
        ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            model(ids)
        snap = runtime.snapshot()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=16, do_sample=False)
        pool = runtime.layers[0].pool
        a, b = pool.expert_in[0], pool.expert_in[1]  # the same two experts, each in the other's slot
        pool._unmap(0), pool._unmap(1)
        for slot, expert in ((0, b), (1, a)):
            pool.store.copy_into(pool.views(slot), expert, non_blocking=False)
            pool._map(slot, expert)
        assert runtime.stats()["total"]["swaps"] > 0  # the generation moved experts too
        copied = runtime.restore(snap)
        assert copied > 0 and runtime.stats()["total"]["restored"] == copied
        for st, want, importance, tokens in zip(runtime.layers, snap.expert_in, snap.importance,
                                                snap.tokens_since_update, strict=True):
            p = st.pool
            assert tuple(p.expert_in) == want
            assert p.resident.nonzero().flatten().tolist() == sorted(want)
            assert [int(p.slot_of[e]) for e in want] == list(range(len(want)))
            for s, e in enumerate(want):
                for name, t in p.slots.items():
                    assert torch.equal(t[s], p.store.tensors[name][e])
            assert torch.equal(st.importance, importance) and st.tokens_since_update == tokens
