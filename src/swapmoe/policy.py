"""The swap policy: which experts to bring in and which to evict (pure, host-side).

Kept apart from the mechanism (:mod:`swapmoe.pool` only moves bytes), as vLLM's expert load
balancer splits algorithm from execution, so it can be tested with literal lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Swap:
    """Load logical expert ``new`` into ``slot``, evicting ``old`` (-1 when the slot was empty)."""

    slot: int
    old: int
    new: int


def plan_swaps(
    importance: Sequence[float],
    expert_in: Sequence[int],
    max_swaps: int,
    min_gain: float = 0.0,
) -> list[Swap]:
    """Move the resident set toward the most important experts, at most ``max_swaps`` at a time.

    ``expert_in[s]`` is the expert in slot ``s`` (-1: empty). The target set is the ``S`` most
    important experts; the most important missing experts replace the least important residents
    (empty slots are filled first). A swap happens only when the newcomer's importance exceeds the
    evictee's by more than ``min_gain`` (relative), which keeps near-ties from thrashing.
    Ties in importance are broken by the lower expert id, so results are deterministic.
    """
    if max_swaps <= 0:
        return []
    num_slots = len(expert_in)
    order = sorted(range(len(importance)), key=lambda e: (-importance[e], e))
    target = set(order[:num_slots])
    resident = {e for e in expert_in if e >= 0}
    incoming = [e for e in order if e in target and e not in resident]
    empty = [s for s, e in enumerate(expert_in) if e < 0]
    evictable = sorted(
        (s for s, e in enumerate(expert_in) if e >= 0 and e not in target),
        key=lambda s: (importance[expert_in[s]], -expert_in[s]),
    )
    swaps: list[Swap] = []
    for new in incoming:
        if len(swaps) >= max_swaps:
            break
        if empty:
            swaps.append(Swap(empty.pop(0), -1, new))
            continue
        if not evictable:
            break
        slot = evictable[0]
        old = expert_in[slot]
        if importance[new] <= importance[old] * (1.0 + min_gain):
            break
        evictable.pop(0)
        swaps.append(Swap(slot, old, new))
    return swaps
