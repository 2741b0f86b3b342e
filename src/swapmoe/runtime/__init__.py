"""The Virtual Experts runtime: hooks on every router, scheduling, counters (``model.swapmoe``).

For every MoE layer a forward hook on the router replaces the router's output ``(logits, weights,
indices)`` with Masked-Gating weights and *slot* ids, so transformers' own experts kernels compute
only resident experts out of the compact ``[S, ...]`` slot tensors. The runtime is split in three:

* :mod:`~swapmoe.runtime.state`: the device tensors a forward (or a graph replay) reads and writes;
* :mod:`~swapmoe.runtime.step`: the in-graph tensor work of one router call (importance, hits,
  Masked Gating), the same in an eager forward and inside a captured CUDA graph;
* :mod:`~swapmoe.runtime.scheduler`: the host side between forwards or replays (every
  ``update_interval`` tokens: importance snapshot -> :func:`swapmoe.policy.plan_swaps` -> swapper).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from swapmoe.errors import first_line
from swapmoe.pool import Swapper
from swapmoe.runtime.scheduler import before_tokens
from swapmoe.runtime.state import IMPORTANCE_KINDS, STRATEGIES, LayerState, RuntimeConfig
from swapmoe.runtime.step import route, sentinel_slot

log = logging.getLogger(__name__)

__all__ = ["IMPORTANCE_KINDS", "STRATEGIES", "LayerState", "RuntimeConfig", "RuntimeSnapshot", "VirtualExperts",
           "sentinel_slot"]


@dataclass(frozen=True)
class RuntimeSnapshot:
    """The adaptive state of every MoE layer at one moment (see :meth:`VirtualExperts.snapshot`):
    the expert in each slot (None for a full layer), the importance scores (host copies ``[E]``) and
    the tokens counted towards the next update."""

    expert_in: tuple[tuple[int, ...] | None, ...]
    importance: tuple[torch.Tensor, ...]
    tokens_since_update: tuple[int, ...]


class VirtualExperts:
    """Virtual Experts for one model: attached as ``model.swapmoe``."""

    def __init__(
        self,
        layers: list[LayerState],
        config: RuntimeConfig,
        device: torch.device,
        budget_bytes: int,
        total_expert_bytes: int,
    ) -> None:
        self.layers = layers
        self.config = config
        self.device = device
        self.budget_bytes = budget_bytes
        self.total_expert_bytes = total_expert_bytes
        self.swapper = Swapper(device, config.async_swaps)
        self.observe = True
        self.in_graph = False  # True while a decode step is being captured (see capturing())
        self.host_driven = False  # True while a baseline decides copies inside the forward (ondemand)
        self.fused: Any = None  # compiled route_tensors for single-token steps (set by a graph decoder)
        self.load_seconds: dict[str, float] = {}  # where the load's time went (set by swapmoe.load)
        for st in layers:
            st.handle = st.layer.router.register_forward_hook(self._make_hook(st))

    # ------------------------------------------------------------------ hook
    def _make_hook(self, st: LayerState):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            return self._on_route(st, args[0], output)

        return hook

    def _on_route(self, st: LayerState, hidden: torch.Tensor, output: Any) -> Any:
        if not self.in_graph:
            # an eager forward schedules here, per layer, before routing; a graph decoder calls
            # before_replay() instead, since a replay runs no Python
            tokens = hidden.reshape(-1, hidden.shape[-1]).shape[0]
            before_tokens(st, tokens, self.config, self.swapper, self.device)
        if st.pool is None:
            # every expert resident: nothing to score or route, and every choice is a hit (counted on
            # the host: no device work at all, so a 100% budget runs at plain transformers' speed)
            return None
        single = hidden.numel() == hidden.shape[-1]  # one token: a decode step (the one captured)
        fused = self.fused if single else None
        if fused is not None:
            try:
                return route(st, self.config, hidden, output, self.observe, fused)
            except torch._dynamo.exc.TorchDynamoException as e:
                # the compile failed before the compiled code ran (importance and hits are untouched):
                # route this call, and every later one, through the uncompiled step
                log.warning("could not compile the router step (%s); routing with the uncompiled step",
                            first_line(e))
                self.fused = None
        return route(st, self.config, hidden, output, self.observe, None)

    # ------------------------------------------------------------ scheduling
    def before_replay(self, tokens: int = 1) -> None:
        """What the router hooks' host side would do for a forward of ``tokens`` tokens, for every
        layer: map finished copies, start due updates, count lookups. A graph decoder calls it before
        each replay (the replay itself runs the in-graph work of :mod:`swapmoe.runtime.step`)."""
        for st in self.layers:
            before_tokens(st, tokens, self.config, self.swapper, self.device)

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Within this block the router hooks do in-graph work only (for capturing a decode step)."""
        previous, self.in_graph = self.in_graph, True
        try:
            yield
        finally:
            self.in_graph = previous

    # ------------------------------------------------------------ controls
    def set_strategy(self, strategy: str) -> None:
        """Switch between "exchange" and "skip" at run time."""
        self.config = RuntimeConfig(**{**asdict(self.config), "strategy": strategy})

    def set_updates(self, update_interval: int | None = None, swaps_per_update: int | None = None) -> None:
        changes = {k: v for k, v in (("update_interval", update_interval), ("swaps_per_update", swaps_per_update))
                   if v is not None}
        self.config = RuntimeConfig(**{**asdict(self.config), **changes})

    def set_async_swaps(self, enabled: bool) -> None:
        """Overlap copies with compute on a side CUDA stream (True) or copy synchronously (False).

        Copies in flight finish first. Used to show the overlap (``--sync-swaps``); no effect on CPU.
        """
        self.synchronize()
        if self.swapper.reader is not None:
            self.swapper.reader.shutdown()  # idle after synchronize(): its thread would linger otherwise
        self.config = RuntimeConfig(**{**asdict(self.config), "async_swaps": enabled})
        self.swapper = Swapper(self.device, enabled)

    def synchronize(self) -> None:
        """Finish every copy in flight and map its expert."""
        for st in self.layers:
            if st.pool is not None:
                self.swapper.poll(st.pool, wait=True)

    def snapshot(self) -> RuntimeSnapshot:
        """The resident sets, importance and update counters, after finishing every copy in flight
        (between forwards): what :meth:`restore` brings the runtime back to."""
        self.synchronize()
        return RuntimeSnapshot(
            tuple(tuple(st.pool.expert_in) if st.pool is not None else None for st in self.layers),
            tuple(st.importance.detach().to("cpu", copy=True) for st in self.layers),
            tuple(st.tokens_since_update for st in self.layers),
        )

    def restore(self, snap: RuntimeSnapshot) -> int:
        """Bring every layer back to ``snap`` (between forwards): copies in flight finish first, the
        experts that differ are copied back synchronously, importance and update counters are reset.

        So every request can start from the same adaptive state (the server's ``--resident-set
        reset``). Returns the experts copied back; they are counted as ``restored``, not as swaps.
        """
        if len(snap.expert_in) != len(self.layers):
            raise ValueError(f"the snapshot has {len(snap.expert_in)} MoE layers; this model has {len(self.layers)}")
        self.synchronize()
        copied = 0
        for st, want, importance, tokens in zip(self.layers, snap.expert_in, snap.importance,
                                                snap.tokens_since_update, strict=True):
            st.importance.copy_(importance)
            st.tokens_since_update = tokens
            st.snapshot_ready = None  # a pinned importance snapshot taken before the restore is stale
            pool = st.pool
            if pool is None or want is None:
                continue
            differ = [s for s, e in enumerate(want) if pool.expert_in[s] != e]
            for s in differ:  # unmap all first: an expert may only have moved to another slot
                pool._unmap(s)
            for s in differ:
                st.bytes_restored += pool.store.copy_into(pool.views(s), want[s], non_blocking=False)
                pool._map(s, want[s])
            st.restored += len(differ)
            copied += len(differ)
        return copied

    def reset_stats(self) -> None:
        for st in self.layers:
            st.hits.zero_()
            st.lookups = st.swaps = st.bytes_copied = st.restored = st.bytes_restored = 0

    def remove(self) -> None:
        """Detach the hooks (the model keeps its slot tensors)."""
        for st in self.layers:
            if st.handle is not None:
                st.handle.remove()
                st.handle = None

    def resident_sets(self) -> list[list[int]]:
        return [st.resident_experts() for st in self.layers]

    # --------------------------------------------------------------- counters
    def stats(self) -> dict[str, Any]:
        """Counters per layer and in total (reads device counters: one sync).

        ``hit_rate`` is ``None`` where no router choice was looked up: a rate that was not measured
        is not 100%.
        """
        layers = []
        for st in self.layers:
            hits = st.lookups if st.pool is None else int(st.hits.item())
            layers.append(
                {
                    "layer": st.layer.index,
                    "module": st.layer.name,
                    "num_experts": st.layer.num_experts,
                    "slots": st.num_slots,
                    "resident_experts": len(st.resident_experts()),
                    "resident_bytes": st.resident_bytes(),
                    "swaps": st.swaps,
                    "bytes_copied": st.bytes_copied,
                    "restored": st.restored,
                    "hits": hits,
                    "lookups": st.lookups,
                    "hit_rate": hits / st.lookups if st.lookups else None,  # None: nothing measured
                    # where the layer's experts live off the device: every expert resident ("device"),
                    # host memory ("host") or the memory-mapped checkpoint files ("checkpoint")
                    "expert_store": "device" if st.pool is None else st.pool.store.location,
                }
            )
        hits = sum(la["hits"] for la in layers)
        lookups = sum(la["lookups"] for la in layers)
        total = {
            "resident_experts": sum(la["resident_experts"] for la in layers),
            "slots": sum(la["slots"] for la in layers),
            "resident_bytes": sum(la["resident_bytes"] for la in layers),
            "budget_bytes": self.budget_bytes,
            "total_expert_bytes": self.total_expert_bytes,
            "swaps": sum(la["swaps"] for la in layers),
            "bytes_copied": sum(la["bytes_copied"] for la in layers),
            "restored": sum(la["restored"] for la in layers),
            "bytes_restored": sum(st.bytes_restored for st in self.layers),
            "hits": hits,
            "lookups": lookups,
            "hit_rate": hits / lookups if lookups else None,  # None: nothing measured
            "host_expert_bytes": sum(st.full_bytes for st in self.layers
                                     if st.pool is not None and st.pool.store.location == "host"),
        }
        return {"total": total, "layers": layers}
