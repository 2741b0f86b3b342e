"""Budgets: what users type, and how bytes become slots per layer."""

import pytest

from swapmoe.budget import Budget, allocate_slots, format_bytes, minimum_bytes, parse_budget
from swapmoe.errors import BudgetError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6GiB", Budget(bytes=6 * 2**30)),
        ("512MiB", Budget(bytes=512 * 2**20)),
        ("1.5GB", Budget(bytes=1_500_000_000)),
        ("2048", Budget(bytes=2048)),
        (" 40% ", Budget(fraction=0.4)),
        ("100%", Budget(fraction=1.0)),
        (0.25, Budget(fraction=0.25)),
        (1000, Budget(bytes=1000)),
    ],
)
def test_parse_budget_accepts_bytes_and_shares(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("bad", ["lots", "6 parsecs", "-1GiB", "0", "0%", "150%", "abc%", 1.5, 0.0, -3, True])
def test_parse_budget_rejects_malformed_with_a_hint(bad):
    with pytest.raises(BudgetError) as e:
        parse_budget(bad)
    msg = str(e.value)
    assert "budget" in msg
    assert any(hint in msg for hint in ("GiB", "%", "(0", "positive"))


def test_fraction_resolves_exactly_on_even_totals():
    assert Budget(fraction=0.5).resolve(1000) == 500
    assert Budget(fraction=0.07).resolve(100) == 7  # 0.07 * 100 = 7.000000000000001 or 6.99...: floor must give 7


def test_minimum_is_topk_experts_per_layer():
    assert minimum_bytes([10, 20], [2, 1]) == 40


def test_allocate_starts_from_topk_and_grows_round_robin():
    # 3 layers of 8 experts of 10 bytes, top-2: minimum 60; 35 more bytes = 3 more slots, first layers first
    assert allocate_slots(95, [10, 10, 10], [8, 8, 8], [2, 2, 2]) == [3, 3, 3]
    assert allocate_slots(85, [10, 10, 10], [8, 8, 8], [2, 2, 2]) == [3, 3, 2]


def test_allocate_never_exceeds_budget_or_experts():
    for budget in range(64, 400, 7):  # minimum: 2*10 + 2*12 + 2*10
        slots = allocate_slots(budget, [10, 12, 10], [8, 4, 8], [2, 2, 2])
        assert sum(s * b for s, b in zip(slots, [10, 12, 10], strict=True)) <= budget
        assert all(2 <= s <= e for s, e in zip(slots, [8, 4, 8], strict=True))
    assert allocate_slots(10**9, [10, 12, 10], [8, 4, 8], [2, 2, 2]) == [8, 4, 8]


def test_impossible_budget_names_the_minimum():
    with pytest.raises(BudgetError, match=r"minimum.*60 bytes") as e:
        allocate_slots(59, [10, 10, 10], [8, 8, 8], [2, 2, 2])
    assert "--memory-budget 60" in str(e.value)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**30) == "3.00 GiB"
