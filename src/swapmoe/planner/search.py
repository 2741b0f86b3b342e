"""Searching the configuration space under a memory budget (and a latency budget), pure functions.

The space: slots per MoE layer ``top_k_l <= S_l <= E_l``, a schedule ``(update_interval I,
swaps_per_update s)`` from a grid (``s = 0``: a static resident set), and the strategy. The
objective is the predicted accuracy penalty of :class:`~swapmoe.planner.perfmodel.PerfModel`; the
constraints are ``memory(S) <= memory budget`` (exact integer arithmetic, never exceeded) and
``predicted decode latency <= latency budget``.

Three methods:

* ``dp``: for each schedule (interval, swaps, strategy) a knapsack-style dynamic programme over the layers whose state is the
  *exact* number of expert bytes used so far; under a latency budget each state keeps the Pareto
  front of (latency, additive penalty), otherwise its best (penalty, latency). Because, for a
  fixed schedule, the penalty is ``g(A(S)) * rho`` with ``g`` non-decreasing and latency is a sum over layers,
  the optimum is among the states kept: the result is the exact optimum of the model.
* ``ga``: a genetic algorithm as in the SwapMoE paper (tournament selection, uniform crossover,
  slot-moving mutation, a repair step that keeps every individual within the memory budget).
* ``exhaustive``: every configuration, for small spaces (tests check ``dp`` against it).

``dp`` is the default: it is exact and faster; the GA is kept for comparison (``--method
compare``) and would matter only for an accuracy model that is not separable over layers.
Among configurations whose penalty is within ``tolerance`` (relative) of the best, the one with
the lowest predicted latency is chosen, so that a measurement-noise difference in accuracy never
buys many more swaps per token.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from swapmoe.budget import allocate_slots, format_bytes
from swapmoe.errors import BudgetError
from swapmoe.planner.perfmodel import STRATEGIES, Config, PerfModel, Prediction

METHODS = ("dp", "ga", "exhaustive")
DEFAULT_INTERVALS = (1, 4, 16, 64, 256)
EXHAUSTIVE_LIMIT = 2_000_000


@dataclass(frozen=True)
class SearchSpace:
    """Schedules and strategies to consider; slots per layer always range over [top-k, E]."""

    intervals: tuple[int, ...] = DEFAULT_INTERVALS
    swaps: tuple[int, ...] = (1, 2)
    strategies: tuple[str, ...] = STRATEGIES
    static: bool = True  # also consider swaps_per_update = 0 (the resident set never moves)
    static_interval: int = 16  # the update_interval written for a static plan (unused at run time)

    def schedules(self) -> list[tuple[int, int, str]]:
        out = [(i, s, st) for st in self.strategies for i in self.intervals for s in self.swaps if s > 0]
        if self.static:
            out += [(self.static_interval, 0, st) for st in self.strategies]
        if not out:
            raise ValueError("the search space has no schedule")
        return out


class InfeasibleError(BudgetError):
    """The budgets cannot be met (together); names the nearest feasible budgets."""

    def __init__(self, message: str, nearest_memory: int | None = None, nearest_latency: float | None = None):
        super().__init__(message)
        self.nearest_memory = nearest_memory
        self.nearest_latency = nearest_latency


@dataclass(frozen=True)
class Result:
    config: Config
    prediction: Prediction
    objective: float
    method: str
    evaluated: int  # configurations (or DP front entries) looked at
    seconds: float


# ----------------------------------------------------------------------------------------- helpers
def format_latency(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}ms"


def parse_latency(text: str | float) -> float:
    """``"20ms"``, ``"0.02s"``, ``"500us"`` or ``"50tok/s"`` -> seconds per token."""
    if isinstance(text, (int, float)):
        return float(text)
    t = text.strip().lower().replace(" ", "")
    units = (("tok/s", None), ("ms", 1e-3), ("us", 1e-6), ("µs", 1e-6), ("s", 1.0))
    for unit, scale in units:
        if t.endswith(unit):
            try:
                v = float(t[: -len(unit)])
            except ValueError:
                break
            if v <= 0 or not math.isfinite(v):
                break
            return 1.0 / v if scale is None else v * scale
    raise BudgetError(f"invalid latency budget {text!r}: give time per token like '20ms', '0.02s' or a rate like '50tok/s'")


def _objective(model: PerfModel, cfg: Config, metric: str) -> tuple[float, float, int]:
    return model.penalty(cfg, metric), model.decode_s(cfg), model.memory(cfg.slots)


def _check_memory(model: PerfModel, memory_budget: int) -> None:
    if memory_budget < model.minimum_bytes:
        m = model.minimum_bytes
        raise InfeasibleError(
            f"memory budget {format_bytes(memory_budget)} is below the minimum of {format_bytes(m)} ({m} bytes: "
            f"top-k experts in each of {model.num_layers} MoE layers); use --memory-budget {m} or more",
            nearest_memory=m,
        )


def _pick(cands: list[tuple[float, float, int, int, Config]], tolerance: float) -> tuple[float, float, int, int, Config]:
    """Best penalty, then (within ``tolerance``) lowest latency, fewest bytes, first schedule."""
    best = min(c[0] for c in cands)
    near = [c for c in cands if c[0] <= best * (1.0 + tolerance) + 1e-15]
    return min(near, key=lambda c: (c[1], c[2], c[0], c[3], c[4].slots))


def _infeasible_latency(model: PerfModel, memory_budget: int, latency_budget: float,
                        fronts: list[tuple[int, float]]) -> InfeasibleError:
    """``fronts``: (bytes, latency) of every configuration on the DP fronts, at any memory."""
    within = [lat for b, lat in fronts if b <= memory_budget]
    fastest = min(within)
    enough = [b for b, lat in fronts if lat <= latency_budget]
    msg = (f"no configuration within the memory budget {format_bytes(memory_budget)} is predicted to decode within "
           f"{format_latency(latency_budget)} per token: the fastest there takes {format_latency(fastest)} "
           f"(nearest feasible: --latency-budget {format_latency(fastest)})")
    if enough:
        m = min(enough)
        msg += (f"; {format_latency(latency_budget)} needs at least {format_bytes(m)} of experts "
                f"({100 * m / model.total_bytes:.1f}%; nearest feasible: --memory-budget {m})")
        return InfeasibleError(msg, nearest_memory=m, nearest_latency=fastest)
    overall = min(lat for _, lat in fronts)
    msg += f"; no memory budget reaches it (the fastest configuration at any memory takes {format_latency(overall)})"
    return InfeasibleError(msg, nearest_memory=None, nearest_latency=fastest)


# -------------------------------------------------------------------------------------------- dp
@dataclass(frozen=True)
class _Node:
    lat: float
    pen: float
    slots: int
    parent: _Node | None


def _pareto(nodes: list[_Node]) -> list[_Node]:
    nodes.sort(key=lambda n: (n.lat, n.pen))
    out: list[_Node] = []
    for n in nodes:
        if not out or n.pen < out[-1].pen:
            out.append(n)
    return out


def _best(nodes: list[_Node]) -> list[_Node]:
    return [min(nodes, key=lambda n: (n.pen, n.lat))]


def _states(model: PerfModel, metric: str, schedule: tuple[int, int, str], cap: int,
            fronts: bool) -> dict[int, list[_Node]]:
    """Exact bytes used -> the configurations worth keeping, for one schedule ``(I, s, strategy)``.

    ``fronts``: the Pareto front of (latency of the layers, additive penalty), exact under a latency
    budget; otherwise only the lexicographic best (penalty, then latency), exact without one (both
    orders survive adding the same layer's option to every entry of a state).
    """
    interval, swaps, strategy = schedule
    acc = model.accuracy[metric][strategy]
    keep = _pareto if fronts else _best
    states: dict[int, list[_Node]] = {0: [_Node(0.0, 0.0, -1, None)]}
    for i, (b, k, e) in enumerate(zip(model.expert_bytes, model.top_k, model.num_experts, strict=True)):
        options = [(s, s * b, model.latency.layer_s(i, s, e, interval, swaps), acc.layer_penalty(i, s))
                   for s in range(k, e + 1)]
        nxt: dict[int, list[_Node]] = {}
        for used, front in states.items():
            for s, ob, olat, open_ in options:
                nb = used + ob
                if nb > cap:
                    break
                nxt.setdefault(nb, []).extend(_Node(n.lat + olat, n.pen + open_, s, n) for n in front)
        states = {nb: keep(nodes) for nb, nodes in nxt.items()}
    return states


def _slots_of(node: _Node) -> tuple[int, ...]:
    out = []
    n: _Node | None = node
    while n is not None and n.slots >= 0:
        out.append(n.slots)
        n = n.parent
    return tuple(reversed(out))


def _schedules(model: PerfModel, space: SearchSpace) -> list[tuple[int, int, str]]:
    out = [sch for sch in space.schedules() if sch[2] in model.strategies]
    if not out:
        raise BudgetError(f"the profile has no accuracy figures for strategy {', '.join(space.strategies)}: "
                          f"profiled: {', '.join(model.strategies)}")
    return out


def search_dp(model: PerfModel, memory_budget: int, latency_budget: float | None = None,
              space: SearchSpace | None = None, metric: str = "kl", tolerance: float = 0.0) -> Result:
    """The exact optimum of the model (see the module docstring).

    Without a latency budget, ``tolerance`` chooses among schedules and memory totals (each with its
    best slots); with one, among every configuration on the fronts.
    """
    start = time.perf_counter()
    _check_memory(model, memory_budget)
    space = space or SearchSpace()
    fronts = latency_budget is not None
    cap = model.total_bytes if fronts else memory_budget  # beyond the budget: to name the nearest budgets
    cands: list[tuple[float, float, int, int, Config]] = []
    seen: list[tuple[int, float]] = []
    looked = 0
    for g, sched in enumerate(_schedules(model, space)):
        interval, swaps, strategy = sched
        acc = model.accuracy[metric][strategy]
        factor = acc.scale(interval, swaps)
        for nb, nodes in _states(model, metric, sched, cap, fronts).items():
            for n in nodes:
                looked += 1
                lat = model.latency.base_s + n.lat
                seen.append((nb, lat))
                if nb > memory_budget or (fronts and lat > latency_budget):
                    continue
                cands.append((acc.calibrate(n.pen) * factor, lat, nb, g, Config(_slots_of(n), *sched)))
    if not cands:
        assert latency_budget is not None
        raise _infeasible_latency(model, memory_budget, latency_budget, seen)
    pen, _, nb, _, cfg = _pick(cands, tolerance)
    assert model.memory(cfg.slots) == nb <= memory_budget
    return Result(cfg, model.predict(cfg), pen, "dp", looked, time.perf_counter() - start)


# ------------------------------------------------------------------------------------ exhaustive
def space_size(model: PerfModel, space: SearchSpace | None = None) -> int:
    space = space or SearchSpace()
    return math.prod(e - k + 1 for k, e in zip(model.top_k, model.num_experts, strict=True)) * len(_schedules(model, space))


def search_exhaustive(model: PerfModel, memory_budget: int, latency_budget: float | None = None,
                      space: SearchSpace | None = None, metric: str = "kl", tolerance: float = 0.0,
                      limit: int = EXHAUSTIVE_LIMIT) -> Result:
    """Every configuration, each predicted through :meth:`PerfModel.predict`'s own code path."""
    start = time.perf_counter()
    _check_memory(model, memory_budget)
    space = space or SearchSpace()
    size = space_size(model, space)
    if size > limit:
        raise BudgetError(f"the space has {size} configurations, more than {limit} to enumerate: use --method dp")
    ranges = [range(k, e + 1) for k, e in zip(model.top_k, model.num_experts, strict=True)]
    cands: list[tuple[float, float, int, int, Config]] = []
    seen: list[tuple[int, float]] = []
    for g, (interval, swaps, strategy) in enumerate(_schedules(model, space)):
        for slots in itertools.product(*ranges):
            cfg = Config(tuple(slots), interval, swaps, strategy)
            pen, lat, nb = _objective(model, cfg, metric)
            seen.append((nb, lat))
            if nb <= memory_budget and (latency_budget is None or lat <= latency_budget):
                cands.append((pen, lat, nb, g, cfg))
    if not cands:
        assert latency_budget is not None
        raise _infeasible_latency(model, memory_budget, latency_budget, seen)
    pen, _, nb, _, cfg = _pick(cands, tolerance)
    return Result(cfg, model.predict(cfg), pen, "exhaustive", size, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------- ga
def _repair(model: PerfModel, slots: list[int], memory_budget: int, metric: str, strategy: str) -> list[int]:
    """Drop slots where they cost least penalty per byte until the configuration fits."""
    acc = model.accuracy[metric][strategy]
    used = sum(s * b for s, b in zip(slots, model.expert_bytes, strict=True))
    while used > memory_budget:
        best = None
        for i, (s, k, b) in enumerate(zip(slots, model.top_k, model.expert_bytes, strict=True)):
            if s > k:
                cost = (acc.layer_penalty(i, s - 1) - acc.layer_penalty(i, s)) / b
                if best is None or cost < best[0]:
                    best = (cost, i)
        assert best is not None  # the memory budget is >= the minimum
        slots[best[1]] -= 1
        used -= model.expert_bytes[best[1]]
    return slots


def search_ga(model: PerfModel, memory_budget: int, latency_budget: float | None = None,
              space: SearchSpace | None = None, metric: str = "kl", tolerance: float = 0.0,
              population: int = 48, generations: int = 150, seed: int = 0) -> Result:
    """A genetic algorithm over (slots, schedule), as the SwapMoE paper's planner."""
    start = time.perf_counter()
    _check_memory(model, memory_budget)
    space = space or SearchSpace()
    schedules = _schedules(model, space)
    rng = random.Random(seed)
    L = model.num_layers
    cache: dict[tuple[tuple[int, ...], int], tuple[float, float, int]] = {}

    def evaluate(slots: tuple[int, ...], g: int) -> tuple[float, float, int]:
        key = (slots, g)
        if key not in cache:
            cache[key] = _objective(model, Config(slots, *schedules[g]), metric)
        return cache[key]

    def fitness(ind: tuple[tuple[int, ...], int]) -> float:
        pen, lat, _ = evaluate(*ind)
        over = 0.0 if latency_budget is None else max(0.0, lat - latency_budget) / latency_budget
        return pen + 1e6 * over

    def random_individual() -> tuple[tuple[int, ...], int]:
        slots = list(model.top_k)
        used = model.minimum_bytes
        layers = list(range(L))
        for _ in range(sum(e - k for k, e in zip(model.top_k, model.num_experts, strict=True))):
            i = rng.choice(layers)
            if slots[i] < model.num_experts[i] and used + model.expert_bytes[i] <= memory_budget:
                slots[i] += 1
                used += model.expert_bytes[i]
        return tuple(slots), rng.randrange(len(schedules))

    def mutate(ind: tuple[tuple[int, ...], int]) -> tuple[tuple[int, ...], int]:
        slots, g = list(ind[0]), ind[1]
        for _ in range(rng.randint(1, 3)):
            a, b = rng.randrange(L), rng.randrange(L)
            op = rng.random()
            if op < 0.5 and slots[a] > model.top_k[a] and slots[b] < model.num_experts[b]:
                slots[a] -= 1  # move a slot from a to b
                slots[b] += 1
            elif op < 0.75 and slots[a] < model.num_experts[a]:
                slots[a] += 1
            elif slots[a] > model.top_k[a]:
                slots[a] -= 1
        if rng.random() < 0.2:
            g = rng.randrange(len(schedules))
        return tuple(_repair(model, slots, memory_budget, metric, schedules[g][2])), g

    def crossover(x: tuple[tuple[int, ...], int], y: tuple[tuple[int, ...], int]) -> tuple[tuple[int, ...], int]:
        slots = [a if rng.random() < 0.5 else b for a, b in zip(x[0], y[0], strict=True)]
        g = x[1] if rng.random() < 0.5 else y[1]
        return tuple(_repair(model, slots, memory_budget, metric, schedules[g][2])), g

    def tournament(pop: list[tuple[tuple[int, ...], int]]) -> tuple[tuple[int, ...], int]:
        return min(rng.sample(pop, min(3, len(pop))), key=fitness)

    pop = [random_individual() for _ in range(population)]
    for _ in range(generations):
        pop.sort(key=fitness)
        nxt = pop[:2]  # elitism
        while len(nxt) < population:
            child = crossover(tournament(pop), tournament(pop)) if rng.random() < 0.8 else tournament(pop)
            nxt.append(mutate(child) if rng.random() < 0.7 else child)
        pop = nxt
    cands = []
    for (slots, g), (pen, lat, nb) in cache.items():
        if nb <= memory_budget and (latency_budget is None or lat <= latency_budget):
            cands.append((pen, lat, nb, g, Config(slots, *schedules[g])))
    if not cands:
        assert latency_budget is not None
        # the GA saw too little of the space to name nearest budgets reliably: ask the exact method
        search_dp(model, memory_budget, latency_budget, space, metric, tolerance)  # raises, naming them
        raise InfeasibleError(f"the genetic algorithm found no configuration within {format_latency(latency_budget)}")
    pen, _, nb, _, cfg = _pick(cands, tolerance)
    assert nb <= memory_budget
    return Result(cfg, model.predict(cfg), pen, "ga", len(cache), time.perf_counter() - start)


# ------------------------------------------------------------------------------------------- api
def search(model: PerfModel, memory_budget: int, latency_budget: float | None = None, method: str = "dp",
           space: SearchSpace | None = None, metric: str = "kl", tolerance: float = 0.0, **kw) -> Result:
    fn = {"dp": search_dp, "ga": search_ga, "exhaustive": search_exhaustive}.get(method)
    if fn is None:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return fn(model, memory_budget, latency_budget, space, metric, tolerance, **kw)


def uniform_config(model: PerfModel, memory_budget: int, update_interval: int = 16, swaps_per_update: int = 1,
                   strategy: str = "exchange") -> Config:
    """The planner-free allocation at the same budget (top-k per layer, then round-robin)."""
    slots = allocate_slots(memory_budget, model.expert_bytes, model.num_experts, model.top_k)
    return Config(tuple(slots), update_interval, swaps_per_update, strategy)


def compare_methods(model: PerfModel, memory_budget: int, latency_budget: float | None = None,
                    space: SearchSpace | None = None, metric: str = "kl",
                    methods: Sequence[str] = METHODS) -> list[Result]:
    """Run several methods on the same problem (exhaustive only where the space is small)."""
    out = []
    for m in methods:
        if m == "exhaustive" and space_size(model, space) > EXHAUSTIVE_LIMIT:
            continue
        out.append(search(model, memory_budget, latency_budget, m, space, metric))
    return out
