"""An independent recount of the hit rate, to check the runtime's counters against.

The runtime counts a hit when a router's *unmasked* top-k choice is resident at the moment the call
is routed (after that step's swaps). This recount observes the same two things from outside: a hook
that runs before swapmoe's on each router keeps the unmasked choices, and one that runs after it reads
the resident mask then. A counter updated at the wrong moment (before the step's swaps), on the masked
choices, or not at all, disagrees with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from swapmoe.routing import unpack_router_output


@contextmanager
def recount_hits(model) -> Iterator[dict[str, int]]:
    """While open, count ``{"hits": ..., "lookups": ...}`` over every MoE layer of ``model``."""
    counts = {"hits": 0, "lookups": 0}
    handles = []
    for st in model.swapmoe.layers:
        seen: dict[str, object] = {}

        def before(module, args, out, st=st, seen=seen):
            seen["indices"] = unpack_router_output(out, st.layer.num_experts)[2].clone()  # [T, K] unmasked

        def after(module, args, out, st=st, seen=seen):
            indices = seen.pop("indices")
            counts["lookups"] += indices.numel()
            counts["hits"] += indices.numel() if st.pool is None else int(st.pool.resident[indices].sum())

        handles.append(st.layer.router.register_forward_hook(before, prepend=True))
        handles.append(st.layer.router.register_forward_hook(after))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()
