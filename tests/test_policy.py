"""The swap policy, with literal importance vectors."""

from swapmoe.policy import Swap, plan_swaps


def test_no_swaps_when_resident_set_is_already_the_most_important():
    assert plan_swaps([5.0, 4.0, 1.0, 0.5], [1, 0], max_swaps=2) == []


def test_most_important_missing_replaces_least_important_resident():
    # resident: experts 2 (imp 1) and 0 (imp 5); expert 3 (imp 9) should replace expert 2
    assert plan_swaps([5.0, 0.0, 1.0, 9.0], [2, 0], max_swaps=1) == [Swap(slot=0, old=2, new=3)]


def test_swaps_are_amortised_by_max_swaps():
    imp = [0.0, 0.0, 0.0, 0.0, 4.0, 3.0, 2.0, 1.0]
    one = plan_swaps(imp, [0, 1, 2, 3], max_swaps=1)
    assert one == [Swap(slot=3, old=3, new=4)]
    all_ = plan_swaps(imp, [0, 1, 2, 3], max_swaps=10)
    assert len(all_) == 4
    assert {s.new for s in all_} == {4, 5, 6, 7}
    assert len({s.slot for s in all_}) == 4  # each slot written once


def test_empty_slots_are_filled_first():
    assert plan_swaps([1.0, 2.0, 3.0], [0, -1], max_swaps=1) == [Swap(slot=1, old=-1, new=2)]


def test_min_gain_prevents_thrashing_on_near_ties():
    assert plan_swaps([1.0, 1.05], [0], max_swaps=1, min_gain=0.1) == []
    assert plan_swaps([1.0, 1.2], [0], max_swaps=1, min_gain=0.1) == [Swap(0, 0, 1)]


def test_zero_swaps_per_update_freezes_the_resident_set():
    assert plan_swaps([0.0, 9.0], [0], max_swaps=0) == []


def test_ties_break_deterministically_by_expert_id():
    assert plan_swaps([1.0, 1.0, 1.0], [2], max_swaps=1) == []  # equal importance: no gain, no swap
    assert plan_swaps([0.0, 2.0, 2.0], [0], max_swaps=1) == [Swap(0, 0, 1)]


def test_least_important_residents_are_evicted_first():
    # target {3, 4, 0}; residents 1 (imp 1) and 2 (imp 3) leave, 1 first
    imp = [5.0, 1.0, 3.0, 9.0, 8.0]
    assert plan_swaps(imp, [0, 1, 2], max_swaps=1) == [Swap(slot=1, old=1, new=3)]
    assert plan_swaps(imp, [0, 1, 2], max_swaps=2) == [Swap(1, 1, 3), Swap(2, 2, 4)]


def test_min_gain_is_relative_to_the_evictee():
    # 2.2 is exactly 10% over 2.0: not more than the margin, no swap; 2.3 is
    assert plan_swaps([2.0, 2.2], [0], max_swaps=1, min_gain=0.1) == []
    assert plan_swaps([2.0, 2.3], [0], max_swaps=1, min_gain=0.1) == [Swap(0, 0, 1)]
    assert plan_swaps([20.0, 21.0], [0], max_swaps=1, min_gain=0.1) == []  # 5%: an absolute margin would swap


def test_empty_slots_are_filled_without_evicting():
    swaps = plan_swaps([1.0, 2.0, 3.0, 0.5], [-1, 3, -1], max_swaps=3)
    assert swaps == [Swap(0, -1, 2), Swap(2, -1, 1), Swap(1, 3, 0)]


def test_swaps_stop_at_max_swaps_exactly():
    imp = [0.0, 0.0, 0.0, 4.0, 3.0, 2.0]
    assert len(plan_swaps(imp, [0, 1, 2], max_swaps=2)) == 2
    assert len(plan_swaps(imp, [0, 1, 2], max_swaps=3)) == 3
