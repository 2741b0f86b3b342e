"""In-graph work of one MoE layer's router call: importance, hit counting, Masked Gating.

Everything here is tensor work on the device tensors of :class:`~swapmoe.runtime.state.LayerState`,
updated in place: no host reads, no host-side counters, nothing whose value a CUDA graph would bake
in except the call's token count (which is fixed for a captured decode step). So the same function
runs in an eager forward and inside a captured decode graph.

    T = tokens in the call, E = logical experts, K = experts per token, S = slots, H = hidden size
"""

from __future__ import annotations

from typing import Any

import torch

from swapmoe.importance import accumulate, importance_increment, token_counts
from swapmoe.pool import SlotPool
from swapmoe.routing import masked_route, repack_router_output, unpack_router_output
from swapmoe.runtime.state import LayerState, RuntimeConfig


def uses_eager_kernel(experts: torch.nn.Module) -> bool:
    """transformers' "eager" experts kernel one-hot encodes slot ids, so it cannot skip a sentinel id
    (``one_hot(num_classes=num_experts)`` fails on ``S``) and cannot be captured (``nonzero``)."""
    return getattr(getattr(experts, "config", None), "_experts_implementation", None) == "eager"


def sentinel_slot(experts: torch.nn.Module, pool: SlotPool) -> int:
    """Slot id of a term that must not count (a skipped or missing expert).

    grouped_mm and batched_mm skip ids >= num_experts, so they get ``S``: a slot no kernel reads.
    The "eager" kernel fails on such ids, so under eager the term goes, with weight 0, to a slot that
    is *mapped*: a mapped slot is never the target of a copy in flight (the swapper unmaps a slot
    before writing it), so the term reads finished weights and adds exactly nothing (x + 0.0 == x;
    with gpt-oss's biases too, as its SwiGLU output is clamped and finite). Eager forwards are never
    captured, so choosing the slot on the host per call is sound.
    """
    if not uses_eager_kernel(experts):
        return pool.num_slots
    return next((s for s, e in enumerate(pool.expert_in) if e >= 0), 0)


def route(st: LayerState, config: RuntimeConfig, hidden: torch.Tensor, output: Any, observe: bool) -> Any:
    """The router's unmasked output -> Masked-Gating weights and slot ids, in the router's layout.

    Scores importance (Eq. 1, or token counts) from the *unmasked* decision, so that experts which
    are not resident are scored too, and counts the choices that were resident.
    """
    pool = st.pool
    assert pool is not None, "a full layer is not routed (every expert resident)"
    # [T, E], [T, K], [T, K]: the router's unmasked decision
    logits, weights, indices, order = unpack_router_output(output, st.layer.num_experts)
    if observe:
        hidden2d = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
        if config.importance == "paper":
            inc = importance_increment(hidden2d, weights, indices, st.norms)  # [E]
        else:
            inc = token_counts(indices, st.layer.num_experts)  # [E]
        accumulate(st.importance, inc, config.decay, indices.shape[0])
    st.hits += pool.resident[indices].sum()
    w, slots = masked_route(
        config.strategy, st.rule, st.params, logits, weights, indices,
        pool.resident, pool.slot_of, pool.num_slots, sentinel_slot(st.layer.experts, pool),
    )
    return repack_router_output(logits, w, slots, order)
