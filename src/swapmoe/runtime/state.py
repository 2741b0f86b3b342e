"""The state of the Virtual Experts runtime: what a decode step reads and writes, and its settings.

Glossary (see also DESIGN.md and :mod:`swapmoe.pool`)
    logical expert  ``(layer, e)``, ``0 <= e < E``: an expert as the checkpoint numbers it
    slot            a fixed place in a layer's device pool holding one expert's weights (``S`` per layer)
    resident        ``[E]`` bool, device: the expert is in a slot and mapped (the Masked Gating mask)
    slot_of         ``[E]`` long, device: the slot of each logical expert, -1 when not resident
    importance      ``[E]`` float32, device: Eq. 1 scores, accumulated with a per-token decay
    hits            ``[]`` long, device: unmasked top-k choices that were resident
    lookups         host int: unmasked top-k choices seen (tokens x K), counted without a device read

The device tensors sit at fixed addresses and are only ever updated in place, so a captured CUDA
graph keeps reading the live values: the in-graph work (:mod:`swapmoe.runtime.step`) writes
``importance`` and ``hits``, the scheduler (:mod:`swapmoe.runtime.scheduler`) flips ``resident`` and
``slot_of`` between replays. Host-side fields (``lookups``, ``tokens_since_update``, ``swaps``...) are
only touched by the scheduler, never inside a forward that may be captured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from swapmoe.families import MoELayer
from swapmoe.pool import SlotPool
from swapmoe.routing import Rule, RuleParams

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
    restored: int = 0  # experts copied back by VirtualExperts.restore (not swaps: no policy chose them)
    bytes_restored: int = 0
    snapshot: torch.Tensor | None = None  # [E] pinned host copy of importance (CUDA)
    snapshot_ready: Any = None  # torch.cuda.Event recorded after the snapshot's copy
    handle: RemovableHandle | None = field(default=None, repr=False)

    @property
    def num_slots(self) -> int:
        return self.layer.num_experts if self.pool is None else self.pool.num_slots

    def resident_bytes(self) -> int:
        return self.full_bytes if self.pool is None else self.pool.slot_bytes()

    def resident_experts(self) -> list[int]:
        return list(range(self.layer.num_experts)) if self.pool is None else self.pool.resident_experts()
