"""The search, on literal performance models: budgets kept, the optimum found, impossible budgets named."""

from __future__ import annotations

import itertools
import random

import pytest

from swapmoe.budget import allocate_slots
from swapmoe.errors import BudgetError
from swapmoe.planner.perfmodel import AccuracyModel, Config, LatencyModel, PerfModel
from swapmoe.planner.search import (
    InfeasibleError,
    SearchSpace,
    parse_latency,
    search,
    search_dp,
    search_exhaustive,
    search_ga,
    uniform_config,
)

SPACE = SearchSpace(intervals=(1, 4, 16), swaps=(1, 2), strategies=("exchange", "skip"))


def literal_model(seed: int, num_layers: int = 3, num_experts: int = 5, top_k: int = 1,
                  expert_bytes: tuple[int, ...] | None = None) -> PerfModel:
    """A model with random non-increasing per-layer curves and every correction switched on."""
    rng = random.Random(seed)
    eb = list(expert_bytes or [rng.choice((100, 100, 150, 250)) for _ in range(num_layers)])
    points = []
    for _ in range(num_layers):
        drops = sorted((rng.uniform(0, 1) for _ in range(num_experts - top_k)), reverse=True)
        ys = list(itertools.accumulate(reversed(drops)))[::-1]  # penalty at S = k..E-1, decreasing
        points.append([(top_k + i, y * rng.uniform(0.2, 3)) for i, y in enumerate(ys)] + [(num_experts, 0.0)])
    acc = AccuracyModel(points, compound=[(0.0, 0.0), (1.0, 1.3), (4.0, 4.5)], interval=[(0.0, 0.8), (2.0, 1.0), (4.0, 1.5)],
                        static=2.5)
    skip = AccuracyModel([[(x, y * rng.uniform(0.5, 1.5)) for x, y in pts] for pts in points],
                         compound=[(0.0, 0.0), (2.0, 1.5), (5.0, 5.0)], interval=acc.interval, static=acc.static)
    lat = LatencyModel(base_s=0.010, per_layer_s=0.0005, per_slot_s=0.0001,
                       policy_s=[rng.uniform(1e-4, 5e-4) for _ in range(num_layers)],
                       swap_s=[rng.uniform(5e-4, 3e-3) for _ in range(num_layers)],
                       swap_rate=[(0.0, 0.6), (2.0, 0.2), (4.0, 0.04)])
    return PerfModel(expert_bytes=eb, num_experts=[num_experts] * num_layers, top_k=[top_k] * num_layers,
                     latency=lat, accuracy={m: {"exchange": acc, "skip": skip} for m in ("kl", "nll")}, nll_full=1.0)


def brute_force(model: PerfModel, memory: int, latency: float | None) -> tuple[float, float] | None:
    """(best penalty, lowest latency at it) over every configuration, straight from predict()."""
    best = None
    for sched in SPACE.schedules():
        for slots in itertools.product(*[range(k, e + 1) for k, e in zip(model.top_k, model.num_experts, strict=True)]):
            cfg = Config(slots, *sched)
            if model.memory(slots) > memory:
                continue
            lat = model.decode_s(cfg)
            if latency is not None and lat > latency:
                continue
            key = (model.penalty(cfg), lat)
            best = key if best is None or key < best else best
    return best


@pytest.mark.parametrize("seed", range(6))
def test_dp_finds_the_brute_force_optimum_and_keeps_every_budget(seed):
    model = literal_model(seed)
    rng = random.Random(100 + seed)
    for _ in range(4):
        memory = rng.randint(model.minimum_bytes, model.total_bytes)
        fastest = min(model.decode_s(Config(tuple(s), *sched)) for sched in SPACE.schedules()
                      for s in [uniform_config(model, memory).slots])
        for latency in (None, fastest * rng.uniform(1.0, 1.3)):
            want = brute_force(model, memory, latency)
            if want is None:
                with pytest.raises(InfeasibleError):
                    search_dp(model, memory, latency, SPACE)
                continue
            for fn in (search_dp, search_exhaustive):
                got = fn(model, memory, latency, SPACE)
                assert got.prediction.expert_bytes == model.memory(got.config.slots) <= memory
                assert latency is None or got.prediction.decode_s_per_token <= latency
                assert got.objective == pytest.approx(want[0], rel=1e-12, abs=1e-15)
                assert got.prediction.decode_s_per_token == pytest.approx(want[1], rel=1e-12)


def test_dp_handles_layers_of_different_expert_sizes_and_top_k():
    model = literal_model(7, num_layers=4, num_experts=4, top_k=2, expert_bytes=(96, 160, 96, 224))
    for memory in range(model.minimum_bytes, model.total_bytes + 1, 97):
        want = brute_force(model, memory, None)
        got = search_dp(model, memory, None, SPACE)
        assert got.objective == pytest.approx(want[0], rel=1e-12, abs=1e-15)
        assert model.memory(got.config.slots) <= memory


def test_the_whole_budget_gives_every_expert_and_zero_penalty():
    model = literal_model(3)
    got = search_dp(model, model.total_bytes, None, SPACE, tolerance=0.01)
    assert list(got.config.slots) == model.num_experts and got.objective == 0.0
    assert got.prediction.decode_s_per_token == model.latency.base_s  # nothing virtualised, nothing swapped


def test_tolerance_trades_a_little_accuracy_for_latency():
    model = literal_model(1)
    memory = (model.minimum_bytes + model.total_bytes) // 2
    exact = search_dp(model, memory, None, SPACE, tolerance=0.0)
    loose = search_dp(model, memory, None, SPACE, tolerance=0.5)
    assert loose.objective <= exact.objective * 1.5 + 1e-15
    assert loose.prediction.decode_s_per_token <= exact.prediction.decode_s_per_token
    # exhaustive looks at every configuration within the tolerance, dp at the best of each memory total
    assert search_exhaustive(model, memory, None, SPACE, tolerance=0.5).prediction.decode_s_per_token <= \
        loose.prediction.decode_s_per_token


@pytest.mark.parametrize("seed", range(3))
def test_genetic_algorithm_keeps_the_budget_and_never_beats_the_exact_optimum(seed):
    model = literal_model(seed, num_layers=4, num_experts=6)
    memory = (model.minimum_bytes + model.total_bytes) // 2
    dp = search_dp(model, memory, None, SPACE)
    ga = search_ga(model, memory, None, SPACE, population=24, generations=40, seed=seed)
    assert model.memory(ga.config.slots) <= memory
    assert ga.objective >= dp.objective - 1e-15
    assert ga.objective <= dp.objective * 1.5 + 1e-12  # and it gets close on a small space


def test_a_memory_budget_below_top_k_everywhere_is_rejected_naming_the_minimum():
    model = literal_model(2)
    for fn in (search_dp, search_exhaustive, search_ga):
        with pytest.raises(InfeasibleError, match=f"--memory-budget {model.minimum_bytes} or more") as e:
            fn(model, model.minimum_bytes - 1, None, SPACE)
        assert e.value.nearest_memory == model.minimum_bytes
        assert isinstance(e.value, BudgetError)  # the CLI prints it as one line, exit code 2


def test_budgets_that_cannot_be_met_together_name_the_nearest_feasible_ones():
    model = literal_model(4)
    memory = model.minimum_bytes + 100
    configs = [Config(s, *sched) for sched in SPACE.schedules()
               for s in itertools.product(*[range(1, 6)] * 3)]
    fastest_within = min(model.decode_s(c) for c in configs if model.memory(c.slots) <= memory)
    latency = fastest_within * 0.999
    with pytest.raises(InfeasibleError, match="cannot|no configuration") as e:
        search_dp(model, memory, latency, SPACE)
    assert e.value.nearest_latency == pytest.approx(fastest_within, rel=1e-12)
    need = min(model.memory(c.slots) for c in configs if model.decode_s(c) <= latency)
    assert e.value.nearest_memory == need > memory
    assert f"--memory-budget {need}" in str(e.value) and "--latency-budget" in str(e.value)
    # both are feasible indeed
    assert search_dp(model, need, latency, SPACE).prediction.expert_bytes <= need
    search_dp(model, memory, e.value.nearest_latency * (1 + 1e-12), SPACE)


def test_a_latency_no_memory_can_reach_says_so():
    model = literal_model(5)
    with pytest.raises(InfeasibleError, match="no memory budget reaches it") as e:
        search(model, model.total_bytes, model.latency.base_s * 0.5, "dp", SPACE)
    assert e.value.nearest_memory is None and e.value.nearest_latency == pytest.approx(model.latency.base_s)


def test_exhaustive_refuses_large_spaces():
    model = literal_model(0, num_layers=8, num_experts=16)
    with pytest.raises(BudgetError, match="--method dp"):
        search_exhaustive(model, model.total_bytes // 2, None, SPACE)
    assert model.memory(search_dp(model, model.total_bytes // 2, None, SPACE).config.slots) <= model.total_bytes // 2


def test_uniform_config_is_the_loaders_allocation():
    model = literal_model(6)
    memory = model.total_bytes // 3
    assert list(uniform_config(model, memory).slots) == allocate_slots(
        memory, model.expert_bytes, model.num_experts, model.top_k)


@pytest.mark.parametrize(("text", "seconds"), [("20ms", 0.02), ("0.5s", 0.5), ("250us", 250e-6), ("50tok/s", 0.02),
                                               ("12 ms", 0.012)])
def test_parse_latency(text, seconds):
    assert parse_latency(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["20", "fast", "-1ms", "0ms", "ms"])
def test_parse_latency_rejects_unclear_budgets(text):
    with pytest.raises(BudgetError, match="latency budget"):
        parse_latency(text)
