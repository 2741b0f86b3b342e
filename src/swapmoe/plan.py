"""Plans: the configuration a run uses, chosen offline and written to JSON.

A plan is ``{update_interval, swaps_per_update, strategy, slots: [S_l per MoE layer]}`` plus what
it was planned for (budget, model), and optionally ``expert_dtype``: one format (``"int8"``) or one
per MoE layer (``["int4", "int8", "bf16", ...]``, null: the model's dtype) in which the experts are
held (docs/quantization.md); absent, the experts stay as the model holds them. Every command that
takes a budget also takes ``--plan``; all of them load through ``swapmoe.load(plan=...)``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from swapmoe.errors import PlanError


@dataclass(frozen=True)
class Plan:
    slots: list[int]
    update_interval: int = 16
    swaps_per_update: int = 1
    strategy: str = "exchange"
    meta: dict[str, Any] = field(default_factory=dict)
    #: experts' format: one for every layer, or one per MoE layer (None: the model's dtype)
    expert_dtype: str | list[str | None] | None = None

    def __post_init__(self) -> None:
        _check_expert_dtype(self.expert_dtype, len(self.slots), "the plan's")

    def to_json(self) -> str:
        d = asdict(self)
        if d["expert_dtype"] is None:  # plans without it read as they did before it existed
            del d["expert_dtype"]
        return json.dumps(d, indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")


def read_plan(path: str | Path) -> Plan:
    """Read and check a plan file; errors name the field and the fix."""
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"plan file {p} does not exist: create one with `swapmoe plan`")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"plan file {p} is not valid JSON ({e}): recreate it with `swapmoe plan`") from None
    if not isinstance(raw, dict):
        raise PlanError(f"plan file {p} must hold a JSON object")
    slots = raw.get("slots")
    if not isinstance(slots, list) or not slots or not all(isinstance(s, int) and s > 0 for s in slots):
        raise PlanError(f"plan file {p}: 'slots' must be a non-empty list of positive integers (one per MoE layer)")
    ints = {"update_interval": 1, "swaps_per_update": 0}
    for key, low in ints.items():
        v = raw.get(key, Plan.__dataclass_fields__[key].default)
        if not isinstance(v, int) or v < low:
            raise PlanError(f"plan file {p}: '{key}' must be an integer >= {low}, got {v!r}")
    strategy = raw.get("strategy", "exchange")
    if strategy not in ("exchange", "skip"):
        raise PlanError(f"plan file {p}: 'strategy' must be 'exchange' or 'skip', got {strategy!r}")
    unknown = set(raw) - {"slots", "update_interval", "swaps_per_update", "strategy", "meta", "expert_dtype"}
    if unknown:
        raise PlanError(f"plan file {p}: unknown field(s) {sorted(unknown)}")
    expert_dtype = raw.get("expert_dtype")
    _check_expert_dtype(expert_dtype, len(slots), f"plan file {p}:")
    return Plan(
        slots=slots,
        expert_dtype=list(expert_dtype) if isinstance(expert_dtype, list) else expert_dtype,
        update_interval=raw.get("update_interval", 16),
        swaps_per_update=raw.get("swaps_per_update", 1),
        strategy=strategy,
        meta=raw.get("meta", {}) if isinstance(raw.get("meta", {}), dict) else {},
    )


def check_slots(slots: list[int], layers: list) -> None:
    """A plan's slots must name every MoE layer, with top-k <= S_l <= E_l."""
    if len(slots) != len(layers):
        raise PlanError(f"the plan has slots for {len(slots)} MoE layers but the model has {len(layers)}")
    for s, la in zip(slots, layers, strict=True):
        if not la.top_k <= s <= la.num_experts:
            raise PlanError(
                f"the plan gives MoE layer {la.index} {s} slots; it needs between top-k={la.top_k} "
                f"and {la.num_experts} (its experts)"
            )


def _check_expert_dtype(value: Any, num_layers: int, prefix: str) -> None:
    """A plan's ``expert_dtype``: a format, or one per MoE layer (as many as ``slots``), else PlanError."""
    from swapmoe.errors import SwapMoEError
    from swapmoe.quant import check_expert_dtypes

    try:
        check_expert_dtypes(value, num_layers, "'expert_dtype'")
    except SwapMoEError as e:
        raise PlanError(f"{prefix} {e}") from None
