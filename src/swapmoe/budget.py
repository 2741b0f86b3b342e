"""Memory budgets: parsing, and turning a budget into slots per MoE layer.

A *budget* is the number of bytes of expert weights allowed in device memory. Users give it as
bytes (``"6GiB"``, ``"512MiB"``, ``"1.5GB"``, ``"123456"``) or as a share of all expert bytes
(``"40%"``, ``0.4``). Non-expert weights and the KV cache are accounted separately and are not part
of the budget.

The allocation here is the planner-free default: every MoE layer first gets its top-k slots (the
fewest with which Masked Gating can still route every token to ``k`` experts), then slots are added
round-robin across layers while the budget allows. With equal expert sizes this is the uniform
allocation of the paper's "simple planning" ablation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from swapmoe.errors import BudgetError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True)
class Budget:
    """A parsed budget: either an absolute byte count or a fraction of all expert bytes."""

    bytes: int | None = None
    fraction: float | None = None

    def resolve(self, total_expert_bytes: int) -> int:
        """Bytes allowed for expert weights, given the bytes of all experts of the model."""
        if self.bytes is not None:
            return self.bytes
        assert self.fraction is not None
        # A tiny epsilon so that "50%" of an even total is not lost to float rounding.
        return int(math.floor(self.fraction * total_expert_bytes + 1e-6))

    def __str__(self) -> str:
        if self.bytes is not None:
            return format_bytes(self.bytes)
        return f"{self.fraction * 100:g}%"


def format_bytes(n: float) -> str:
    """Human-readable binary size, e.g. ``1.50 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_budget(value: str | int | float | Budget) -> Budget:
    """Parse ``"6GiB"``, ``"512MiB"``, ``"40%"``, ``0.4`` (a fraction) or an int (bytes)."""
    if isinstance(value, Budget):
        return value
    if isinstance(value, bool):
        raise BudgetError(f"invalid memory budget {value!r}: give bytes like '6GiB' or a share like '40%'")
    if isinstance(value, int):
        if value <= 0:
            raise BudgetError(f"memory budget must be positive, got {value}")
        return Budget(bytes=value)
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise BudgetError(
                f"a fractional memory budget must be in (0, 1], got {value}; use '40%' or 0.4 for 40%"
            )
        return Budget(fraction=value)
    text = str(value).strip()
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise BudgetError(f"invalid memory budget {value!r}: a share must look like '40%'") from None
        if not 0 < pct <= 100:
            raise BudgetError(f"memory budget {value!r} must be a share in (0%, 100%]")
        return Budget(fraction=pct / 100)
    return Budget(bytes=parse_size(text))


def parse_size(text: str) -> int:
    """Parse a byte size such as ``6GiB``, ``512MiB``, ``1.5GB`` or ``1000``."""
    m = _SIZE_RE.match(text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise BudgetError(
            f"invalid memory budget {text!r}: give bytes with a unit (e.g. '6GiB', '512MiB', '2GB') "
            "or a share of all experts (e.g. '40%')"
        )
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise BudgetError(f"memory budget must be positive, got {text!r}")
    return n


def minimum_bytes(expert_bytes: Sequence[int], top_k: Sequence[int]) -> int:
    """The smallest feasible budget: top-k experts resident in every MoE layer."""
    return sum(b * k for b, k in zip(expert_bytes, top_k, strict=True))


def allocate_slots(
    budget_bytes: int,
    expert_bytes: Sequence[int],
    num_experts: Sequence[int],
    top_k: Sequence[int],
) -> list[int]:
    """Slots per MoE layer for a byte budget (pure).

    Every layer starts with ``top_k`` slots; then one slot at a time is added to each layer in
    turn (round-robin, first layers first) while the next slot still fits and the layer is not full.
    Raises :class:`BudgetError` naming the minimum budget when even top-k slots do not fit.
    """
    if not (len(expert_bytes) == len(num_experts) == len(top_k)):
        raise ValueError("expert_bytes, num_experts and top_k must have one entry per MoE layer")
    floor = minimum_bytes(expert_bytes, top_k)
    if budget_bytes < floor:
        raise BudgetError(
            f"memory budget {format_bytes(budget_bytes)} is below the minimum of {format_bytes(floor)} "
            f"({floor} bytes: top-k experts in each of {len(expert_bytes)} MoE layers); "
            f"use --memory-budget {floor} or more"
        )
    slots = [min(k, e) for k, e in zip(top_k, num_experts, strict=True)]
    left = budget_bytes - sum(s * b for s, b in zip(slots, expert_bytes, strict=True))
    grew = True
    while grew:
        grew = False
        for i, (b, e) in enumerate(zip(expert_bytes, num_experts, strict=True)):
            if slots[i] < e and b <= left:
                slots[i] += 1
                left -= b
                grew = True
    return slots
