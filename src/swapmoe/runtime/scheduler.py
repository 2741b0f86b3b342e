"""Between forwards (or graph replays): when to update a resident set, and starting the update.

Every ``update_interval`` tokens a layer's importance is read on the host (on CUDA from a pinned
snapshot copied asynchronously at the previous update, so no host sync), the pure policy
(:func:`swapmoe.policy.plan_swaps`) picks at most ``swaps_per_update`` swaps, and the swapper
(:mod:`swapmoe.pool`) starts them. Copies that finished since the last call are mapped first. This
code runs on the host only, never inside a forward that may be captured in a CUDA graph: an eager
forward calls it from the router hook before routing, a graph decoder calls it before each replay.
"""

from __future__ import annotations

import torch

from swapmoe.policy import plan_swaps
from swapmoe.pool import Swapper
from swapmoe.runtime.state import LayerState, RuntimeConfig


def before_tokens(st: LayerState, tokens: int, config: RuntimeConfig, swapper: Swapper, device: torch.device) -> None:
    """Account for a call of ``tokens`` tokens about to be routed in this layer; update first if due.

    The update comes before routing, so the call sees the maps it leaves behind.
    """
    st.lookups += tokens * st.layer.top_k
    if st.pool is None:
        return  # every expert resident: nothing to score, route or swap
    maybe_update(st, config, swapper, device)
    st.tokens_since_update += tokens


def maybe_update(st: LayerState, config: RuntimeConfig, swapper: Swapper, device: torch.device) -> None:
    """Map finished copies; if an update is due (and the last one has finished), start the next."""
    pool = st.pool
    assert pool is not None
    swapper.poll(pool)
    if config.swaps_per_update == 0 or st.tokens_since_update < config.update_interval:
        return
    if pool.pending:
        return  # the last update is still copying; amortise rather than queue up
    # A call of many tokens (a prefill, an evaluation window) spans several update intervals: it is
    # owed that many updates' worth of swaps, done now, before it is routed.
    due = st.tokens_since_update // config.update_interval
    importance = importance_on_host(st, device, fresh=due > 1)
    if importance is None:
        return
    st.tokens_since_update = 0
    swaps = plan_swaps(importance, pool.expert_in, config.swaps_per_update * due, config.min_gain)
    if swaps:
        st.bytes_copied += swapper.submit(pool, swaps)
        st.swaps += len(swaps)
        if due > 1:
            # a long call would otherwise run with the incoming slots unmapped throughout: make the
            # compute stream wait for the copies instead (a device-side wait, no host sync)
            swapper.poll(pool, wait=True)


def importance_on_host(st: LayerState, device: torch.device, fresh: bool = False) -> list[float] | None:
    """Importance as a host list without a per-step sync on CUDA.

    On CUDA the scores are copied asynchronously into pinned memory at each update and used at the
    next one once the copy has landed (one interval old); None if it has not landed yet. On CPU they
    are read directly. ``fresh`` reads them now (one sync): for a call that spans several intervals
    (a prefill, an evaluation window) the sync is amortised over all its tokens, and a snapshot one
    *call* old would be a whole window stale. After a fresh read a new snapshot is started at once,
    so the next update plans from scores taken after this call, not from an earlier request's.
    """
    if device.type != "cuda":
        return st.importance.tolist()
    if fresh:
        scores = st.importance.tolist()
        start_snapshot(st)
        return scores
    ready = None
    if st.snapshot is not None and st.snapshot_ready is not None and st.snapshot_ready.query():
        ready = st.snapshot.tolist()
    start_snapshot(st)
    return ready


def start_snapshot(st: LayerState) -> None:
    """Copy the importance into the pinned snapshot, asynchronously, and record when it lands."""
    if st.snapshot is None:
        st.snapshot = torch.empty_like(st.importance, device="cpu").pin_memory()
    st.snapshot.copy_(st.importance, non_blocking=True)
    st.snapshot_ready = torch.cuda.Event()
    st.snapshot_ready.record()
