"""The in-graph step of a router call (swapmoe.runtime.step): the compiled form the CUDA graph decoder
uses computes what the eager form computes."""

from __future__ import annotations

import pytest
import torch

from swapmoe.routing import RuleParams, softmax_topk
from swapmoe.runtime.step import compiled_route, route_tensors


def _inputs(num_slots: int):
    g = torch.Generator().manual_seed(0)
    e, k, h = 8, 2, 16
    logits = torch.randn(1, e, generator=g)  # [T=1, E]
    probs = logits.softmax(-1)
    weights, indices = probs.topk(k, dim=-1)  # [1, K]
    weights = weights / weights.sum(-1, keepdim=True)
    resident = torch.zeros(e, dtype=torch.bool)
    resident[[1, 3, 4, 6, 7][:num_slots]] = True
    slot_of = torch.full((e,), -1, dtype=torch.long)
    slot_of[resident] = torch.arange(num_slots)
    hidden = torch.randn(1, h, generator=g)
    norms = torch.rand(e, generator=g) + 0.5
    return hidden, logits, weights, indices, norms, resident, slot_of


@pytest.mark.parametrize("strategy", ["exchange", "skip"])
def test_compiled_step_equals_the_eager_step(strategy):
    fused = compiled_route()
    params = RuleParams(top_k=2, norm_topk_prob=True)
    for num_slots in (3, 5):  # two slot counts: a plan gives layers different ones
        hidden, logits, weights, indices, norms, resident, slot_of = _inputs(num_slots)
        outs = []
        for fn in (route_tensors, fused):
            importance = torch.full((8,), 0.5)
            hits = torch.zeros((), dtype=torch.long)
            w, slots = fn(strategy, "paper", 0.9, True, softmax_topk, params, hidden, logits, weights, indices,
                          norms, importance, hits, resident, slot_of, num_slots, num_slots)
            outs.append((w, slots, importance, hits))
        (w0, s0, i0, h0), (w1, s1, i1, h1) = outs
        torch.testing.assert_close(w1, w0, rtol=1e-6, atol=1e-7)
        assert torch.equal(s1, s0) and torch.equal(h1, h0)
        torch.testing.assert_close(i1, i0, rtol=1e-6, atol=1e-7)
        assert not torch.equal(i0, torch.full((8,), 0.45))  # the increment was added, not only the decay
