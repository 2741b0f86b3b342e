"""On-demand expert loading: the exact baseline (mixtral-offloading style).

No Masked Gating: every token gets the experts its router chose. A chosen expert that is not in a
slot is copied in when the layer runs, evicting the least recently used slot, so outputs equal the
full model's (up to the order in which terms are summed) and the cost is paid in transfers on the
critical path. The slots are the same as swapmoe's for the same budget, so the two compare at the
same memory.

When one call needs more distinct experts than the layer has slots (a long prefill), the call is
computed in groups of at most ``S`` experts, each group loaded in turn, and the group outputs are
summed: the experts module computes ``sum_k w_k * E_k(x)``, so splitting the ``k`` terms is exact.

    T = tokens in the call, K = experts per token, E = logical experts, S = slots
"""

from __future__ import annotations

import types
from typing import Any

import torch

from swapmoe.routing import unpack_router_output
from swapmoe.runtime import LayerState, VirtualExperts, sentinel_slot


class OnDemand:
    """Replaces Masked Gating on a loaded model by exact on-demand loading into LRU slots."""

    def __init__(self, runtime: VirtualExperts) -> None:
        runtime.remove()  # no masked routing, no importance-driven updates
        runtime.host_driven = True  # copies decided inside the forward: no graph capture
        self.runtime = runtime
        self.clock = 0
        self._restore: list[tuple[torch.nn.Module, Any]] = []
        for st in runtime.layers:
            if st.pool is None:
                continue
            st.handle = st.layer.router.register_forward_hook(self._make_counter(st))
            experts = st.layer.experts
            last_used = [0] * st.pool.num_slots
            self._restore.append((experts, experts.__dict__.get("forward")))
            experts.forward = types.MethodType(self._make_forward(st, experts.forward, last_used), experts)

    def _make_counter(self, st: LayerState):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            _, _, indices, _ = unpack_router_output(output, st.layer.num_experts)  # [T, K]
            assert st.pool is not None
            st.lookups += indices.numel()
            st.hits += st.pool.resident[indices].sum()  # resident *before* this call's loads
            return None

        return hook

    def _make_forward(self, st: LayerState, inner: Any, last_used: list[int]):
        pool = st.pool
        assert pool is not None
        num_slots = pool.num_slots
        sentinel = sentinel_slot(st.layer.experts, pool)

        def forward(_self: torch.nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
            num_experts = st.layer.num_experts
            # host sync: loading on demand needs the ids; ids >= E carry no term (a token an adapter
            # dropped, e.g. over Switch's expert capacity) and need no expert
            needed = [e for e in torch.unique(top_k_index).tolist() if e < num_experts]
            ids = top_k_index.clamp(max=num_experts - 1)  # [T, K], indexable; dropped terms never kept
            where = {e: s for s, e in enumerate(pool.expert_in) if e >= 0}
            needed.sort(key=lambda e: e not in where)  # resident experts first: fewer loads
            out = None
            for i in range(0, len(needed), num_slots):
                group = needed[i : i + num_slots]
                self._ensure(st, group, last_used)
                in_group = torch.zeros(num_experts, dtype=torch.bool, device=top_k_index.device)
                in_group[group] = True
                keep = in_group[ids] & (top_k_index < num_experts)  # [T, K]
                slots = pool.slot_of[ids].masked_fill(~keep, sentinel)  # [T, K]
                weights = top_k_weights.masked_fill(~keep, 0)  # a sentinel term adds exactly nothing
                part = inner(hidden, slots, weights)
                out = part if out is None else out + part
            return out if out is not None else torch.zeros_like(hidden)  # every term dropped

        return forward

    def _ensure(self, st: LayerState, group: list[int], last_used: list[int]) -> None:
        """Load the experts of ``group`` that are not resident, evicting least recently used slots."""
        pool = st.pool
        assert pool is not None
        self.clock += 1
        keep = set(group)
        for e in group:
            if e in pool.expert_in:
                last_used[pool.expert_in.index(e)] = self.clock
                continue
            free = [s for s, x in enumerate(pool.expert_in) if x not in keep]
            slot = min(free, key=lambda s: (pool.expert_in[s] >= 0, last_used[s]))
            pool._unmap(slot)
            st.bytes_copied += pool.store.copy_into(pool.views(slot), e, non_blocking=False)
            pool._map(slot, e)
            st.swaps += 1
            last_used[slot] = self.clock

    def remove(self) -> None:
        """Detach: hooks off, experts modules back to their own forward."""
        self.runtime.remove()
        self.runtime.host_driven = False
        for experts, original in self._restore:
            if original is None:
                experts.__dict__.pop("forward", None)
            else:
                experts.forward = original
        self._restore.clear()
