"""The Virtual Experts runtime: hooks on every router, importance, scheduling, counters.

One :class:`VirtualExperts` is attached to a loaded model as ``model.swapmoe``. For every MoE layer
a forward hook on the router replaces the router's output ``(logits, weights, indices)`` with
Masked-Gating weights and *slot* ids, so transformers' own experts kernels compute only resident
experts out of the compact ``[S, ...]`` slot tensors. The same hook scores importance from the
unmasked output and, every ``update_interval`` tokens, asks the policy for at most
``swaps_per_update`` swaps (amortised), which the swapper carries out asynchronously on CUDA.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from swapmoe.families import MoELayer
from swapmoe.importance import accumulate, importance_increment, token_counts
from swapmoe.policy import plan_swaps
from swapmoe.pool import SlotPool, Swapper
from swapmoe.routing import Rule, RuleParams, masked_route, repack_router_output, unpack_router_output

STRATEGIES = ("exchange", "skip")
IMPORTANCE_KINDS = ("paper", "count")


@dataclass(frozen=True)
class RuntimeConfig:
    """How the resident sets behave at run time.

    update_interval   tokens between two updates of a layer's resident set
    swaps_per_update  most experts swapped per layer per update (0: the resident set never moves)
    decay             per-token decay of accumulated importance (1.0: no forgetting)
    strategy          "exchange" (best resident expert instead) or "skip" (drop the missing term)
    importance        "paper" (Eq. 1: ||x|| * gate * ||E||) or "count" (tokens routed, an ablation)
    min_gain          relative importance margin a newcomer needs over its evictee
    async_swaps       copy on a side CUDA stream, overlapping compute (ignored on CPU)
    """

    update_interval: int = 16
    swaps_per_update: int = 1
    decay: float = 0.98
    strategy: str = "exchange"
    importance: str = "paper"
    min_gain: float = 0.0
    async_swaps: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.importance not in IMPORTANCE_KINDS:
            raise ValueError(f"importance must be one of {IMPORTANCE_KINDS}, got {self.importance!r}")
        if self.update_interval < 1:
            raise ValueError("update_interval must be >= 1")
        if self.swaps_per_update < 0:
            raise ValueError("swaps_per_update must be >= 0")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError("decay must be in (0, 1]")


@dataclass
class LayerState:
    """Run-time state of one MoE layer."""

    layer: MoELayer
    pool: SlotPool | None  # None: every expert resident (no masking, no swapping)
    rule: Rule | None
    params: RuleParams | None
    norms: torch.Tensor  # [E] ||E_i||, device
    importance: torch.Tensor  # [E] float32, device
    full_bytes: int  # device bytes of expert weights when the layer is full
    hits: torch.Tensor  # [] long, device: unmasked top-k choices that were resident
    lookups: int = 0
    swaps: int = 0
    bytes_copied: int = 0
    tokens_since_update: int = 0
    snapshot: torch.Tensor | None = None  # pinned host copy of importance (CUDA)
    snapshot_ready: Any = None  # torch.cuda.Event
    handle: RemovableHandle | None = field(default=None, repr=False)

    @property
    def num_slots(self) -> int:
        return self.layer.num_experts if self.pool is None else self.pool.num_slots

    def resident_bytes(self) -> int:
        return self.full_bytes if self.pool is None else self.pool.slot_bytes()

    def resident_experts(self) -> list[int]:
        return list(range(self.layer.num_experts)) if self.pool is None else self.pool.resident_experts()


def _sentinel(experts: torch.nn.Module, num_slots: int) -> int:
    """Slot id of a term that must not count (a skipped expert).

    grouped_mm and batched_mm skip (or clamp and zero) ids >= num_experts, so they get ``num_slots``.
    The "eager" kernel of transformers 5.17 fails on such ids (``one_hot(num_classes=num_experts)``),
    and so does gpt-oss's own eager forward in 5.23, so under eager the term goes to slot 0 with
    weight 0: exactly nothing is added (x + 0.0 == x). With biases (gpt-oss) that still holds: the
    slot's output, biases included, is finite (its SwiGLU is clamped), and finite * 0 is a zero.
    """
    impl = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    return 0 if impl == "eager" else num_slots


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
        for st in layers:
            st.handle = st.layer.router.register_forward_hook(self._make_hook(st))

    # ------------------------------------------------------------------ hook
    def _make_hook(self, st: LayerState):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            return self._on_route(st, args[0], output)

        return hook

    def _on_route(self, st: LayerState, hidden: torch.Tensor, output: Any) -> Any:
        # [T, E], [T, K], [T, K]: the router's unmasked decision
        logits, weights, indices, order = unpack_router_output(output, st.layer.num_experts)
        tokens = indices.shape[0]
        st.lookups += indices.numel()
        if st.pool is None:
            # every expert resident: nothing to score or route, and every choice is a hit (counted on
            # the host: no device work at all, so a 100% budget runs at plain transformers' speed)
            return None
        self._maybe_update(st)  # before routing: this call sees the new maps
        if self.observe:
            hidden2d = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
            if self.config.importance == "paper":
                inc = importance_increment(hidden2d, weights, indices, st.norms)
            else:
                inc = token_counts(indices, st.layer.num_experts)
            accumulate(st.importance, inc, self.config.decay, tokens)
        st.tokens_since_update += tokens
        pool = st.pool
        st.hits += pool.resident[indices].sum()
        w, slots = masked_route(
            self.config.strategy, st.rule, st.params, logits, weights, indices,
            pool.resident, pool.slot_of, pool.num_slots, _sentinel(st.layer.experts, pool.num_slots),
        )
        return repack_router_output(logits, w, slots, order)

    # ------------------------------------------------------------ scheduling
    def _maybe_update(self, st: LayerState) -> None:
        pool = st.pool
        assert pool is not None
        self.swapper.poll(pool)
        if self.config.swaps_per_update == 0 or st.tokens_since_update < self.config.update_interval:
            return
        if pool.pending:
            return  # the last update is still copying; amortise rather than queue up
        # A call of many tokens (a prefill, an evaluation window) spans several update intervals: it is
        # owed that many updates' worth of swaps, done now, before it is routed.
        due = st.tokens_since_update // self.config.update_interval
        importance = self._importance_on_host(st, fresh=due > 1)
        if importance is None:
            return
        st.tokens_since_update = 0
        swaps = plan_swaps(importance, pool.expert_in, self.config.swaps_per_update * due, self.config.min_gain)
        if swaps:
            st.bytes_copied += self.swapper.submit(pool, swaps)
            st.swaps += len(swaps)
            if due > 1:
                # a long call would otherwise run with the incoming slots unmapped throughout: make the
                # compute stream wait for the copies instead (a device-side wait, no host sync)
                self.swapper.poll(pool, wait=True)

    def _importance_on_host(self, st: LayerState, fresh: bool = False) -> list[float] | None:
        """Importance as a host list without a per-step sync on CUDA.

        On CUDA the scores are copied asynchronously into pinned memory and used at the next update
        once the copy has landed (one interval old); on CPU they are read directly. ``fresh`` reads
        them now (one sync): for a call that spans several intervals (a prefill, an evaluation
        window) the sync is amortised over all its tokens, and a snapshot one *call* old would be
        a whole window stale.
        """
        if self.device.type != "cuda" or fresh:
            return st.importance.tolist()
        ready = None
        if st.snapshot is not None and st.snapshot_ready is not None and st.snapshot_ready.query():
            ready = st.snapshot.tolist()
        if st.snapshot is None:
            st.snapshot = torch.empty_like(st.importance, device="cpu").pin_memory()
        st.snapshot.copy_(st.importance, non_blocking=True)
        st.snapshot_ready = torch.cuda.Event()
        st.snapshot_ready.record()
        return ready

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
        self.config = RuntimeConfig(**{**asdict(self.config), "async_swaps": enabled})
        self.swapper = Swapper(self.device, enabled)

    def synchronize(self) -> None:
        """Finish every copy in flight and map its expert."""
        for st in self.layers:
            if st.pool is not None:
                self.swapper.poll(st.pool, wait=True)

    def reset_stats(self) -> None:
        for st in self.layers:
            st.hits.zero_()
            st.lookups = st.swaps = st.bytes_copied = 0

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
            "hits": hits,
            "lookups": lookups,
            "hit_rate": hits / lookups if lookups else None,  # None: nothing measured
            "host_expert_bytes": sum(st.full_bytes for st in self.layers
                                     if st.pool is not None and st.pool.store.location == "host"),
        }
        return {"total": total, "layers": layers}
