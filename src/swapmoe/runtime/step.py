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


def route(st: LayerState, config: RuntimeConfig, hidden: torch.Tensor, output: Any, observe: bool,
          fused: Any = None) -> Any:
    """The router's unmasked output -> Masked-Gating weights and slot ids, in the router's layout.

    Scores importance (Eq. 1, or token counts) from the *unmasked* decision, so that experts which
    are not resident are scored too, and counts the choices that were resident. ``fused`` is
    :func:`route_tensors` compiled (see :func:`compiled_route`), for single-token steps on CUDA.
    """
    pool = st.pool
    assert pool is not None, "a full layer is not routed (every expert resident)"
    # [T, E], [T, K], [T, K]: the router's unmasked decision
    logits, weights, indices, order = unpack_router_output(output, st.layer.num_experts)
    fn = fused if fused is not None else route_tensors
    w, slots = fn(
        config.strategy, config.importance, config.decay, observe, st.rule, st.params,
        hidden.reshape(-1, hidden.shape[-1]), logits, weights, indices, st.norms, st.importance, st.hits,
        pool.resident, pool.slot_of, pool.num_slots, sentinel_slot(st.layer.experts, pool),
    )
    return repack_router_output(logits, w, slots, order)


def route_tensors(
    strategy: str, importance_kind: str, decay: float, observe: bool, rule: Any, params: Any,
    hidden: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
    norms: torch.Tensor, importance: torch.Tensor, hits: torch.Tensor, resident: torch.Tensor,
    slot_of: torch.Tensor, num_slots: int, sentinel: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensor work of :func:`route` on plain tensors (``hidden [T, H]``; ``importance [E]`` and
    ``hits []`` updated in place): one function, so that it can be compiled into a few kernels."""
    if observe:
        if importance_kind == "paper":
            inc = importance_increment(hidden, weights, indices, norms)  # [E]
        else:
            inc = token_counts(indices, norms.shape[0])  # [E]
        accumulate(importance, inc, decay, indices.shape[0])
    hits += resident[indices].sum()
    return masked_route(strategy, rule, params, logits, weights, indices, resident, slot_of, num_slots, sentinel)


def compiled_route() -> Any:
    """:func:`route_tensors` compiled with torch.compile (inductor): the ~30 small kernels a router call
    launches become a few fused ones. A decode step has one token, and every layer of a model shares
    the compiled code (its guards are on shapes and constants, not on which layer's tensors come in). Compilation happens at the first single-token call, which the decoder
    runs eagerly before it captures the step; a capture replays the compiled kernels."""
    # dynamic=None: a second slot count (layers of a plan differ) recompiles once with the ints symbolic
    return torch.compile(route_tensors, dynamic=None)
