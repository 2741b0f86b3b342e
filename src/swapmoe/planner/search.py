"""Searching the configuration space under a memory budget (and a latency budget), pure functions.

The space: slots per MoE layer ``top_k_l <= S_l <= E_l`` and its format ``F_l`` (the profile's
base, or any other format it measured: :attr:`PerfModel.formats`, never a list of names here, so
formats added to :mod:`swapmoe.quant` are searched once profiled), a schedule ``(update_interval I,
swaps_per_update s)`` from a grid (``s = 0``: a static resident set), and the strategy. The
objective is the predicted accuracy penalty of :class:`~swapmoe.planner.perfmodel.PerfModel`; the
constraints are ``memory(S, F) <= memory budget`` (exact integer arithmetic in each layer's format's
bytes, never exceeded) and ``predicted decode latency <= latency budget``.

Three methods:

* ``dp``: for each schedule (interval, swaps, strategy) a knapsack-style dynamic programme over the layers whose state is the
  *exact* number of expert bytes used so far, each layer's options being its (slots, format)
  pairs; under a latency budget each state keeps the Pareto front of (latency, additive penalty),
  otherwise its best (penalty, latency). Because, for a fixed schedule, the penalty is
  ``g(A) * rho`` with ``g`` non-decreasing and latency is a sum over layers, the optimum is among the
  states kept: the result is the exact optimum of the model. An entry that another entry with
  fewer or as many bytes beats on both latency and penalty is dropped (so is a layer option beaten
  so by another): with several formats there are many byte totals, and what a dominated entry can
  become, its dominator becomes as well, at no more bytes.
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

import bisect
import itertools
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from swapmoe.budget import allocate_slots, format_bytes
from swapmoe.errors import BudgetError
from swapmoe.planner.perfmodel import STRATEGIES, Config, PerfModel, Prediction

METHODS = ("dp", "ga", "exhaustive")
DEFAULT_INTERVALS = (1, 4, 16, 64, 256)
EXHAUSTIVE_LIMIT = 2_000_000


@dataclass(frozen=True)
class SearchSpace:
    """Schedules, strategies and formats to consider; slots per layer always range over [top-k, E]."""

    intervals: tuple[int, ...] = DEFAULT_INTERVALS
    swaps: tuple[int, ...] = (1, 2)
    strategies: tuple[str, ...] = STRATEGIES
    static: bool = True  # also consider swaps_per_update = 0 (the resident set never moves)
    static_interval: int = 16  # the update_interval written for a static plan (unused at run time)
    #: formats a layer may take (None: the profile's base); None: every format the model knows
    formats: tuple[str | None, ...] | None = None

    def layer_formats(self, model: PerfModel) -> list[str | None]:
        known = model.formats
        if self.formats is None:
            return known
        out = [f for f in known if f in self.formats]
        if not out:
            raise BudgetError(f"none of the formats {', '.join(f or 'base' for f in self.formats)} was profiled "
                              f"(profiled: {', '.join(f or 'base' for f in known)})")
        return out

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
    return model.penalty(cfg, metric), model.decode_s(cfg), model.memory(cfg.slots, cfg.formats())


def minimum_bytes(model: PerfModel, formats: Sequence[str | None]) -> int:
    """Top-k experts per layer in its most compact format among ``formats``."""
    return sum(k * min(model.layer_bytes(i, f) for f in formats) for i, k in enumerate(model.top_k))


def _config(slots: Sequence[int], formats: Sequence[str | None], schedule: tuple[int, int, str]) -> Config:
    """A configuration; formats only where a layer leaves the base (a base-only plan reads as before)."""
    fmts = tuple(formats)
    return Config(tuple(slots), *schedule, fmts if any(f is not None for f in fmts) else None)


def _check_memory(model: PerfModel, memory_budget: int, formats: Sequence[str | None] | None = None) -> None:
    m = minimum_bytes(model, formats if formats is not None else model.formats)
    if memory_budget < m:
        raise InfeasibleError(
            f"memory budget {format_bytes(memory_budget)} is below the minimum of {format_bytes(m)} ({m} bytes: "
            f"top-k experts in each of {model.num_layers} MoE layers"
            + (", in the most compact format profiled" if len(formats or model.formats) > 1 else "")
            + f"); use --memory-budget {m} or more",
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
# A DP entry: (latency of the layers so far, additive penalty, slots, format, parent entry); plain
# tuples, as millions are made on a large space
_Node = tuple  # (lat, pen, slots, fmt, parent)


def _pareto(nodes: list[_Node]) -> list[_Node]:
    nodes.sort(key=lambda n: (n[0], n[1]))
    out: list[_Node] = []
    for n in nodes:
        if not out or n[1] < out[-1][1]:
            out.append(n)
    return out


class _Staircase:
    """(latency, penalty) points no other point beats on both: latency ascending, penalty descending."""

    def __init__(self) -> None:
        self.lats: list[float] = []
        self.pens: list[float] = []

    def beats(self, lat: float, pen: float) -> bool:
        """Is there a point with latency <= ``lat`` and penalty <= ``pen``?"""
        j = bisect.bisect_right(self.lats, lat) - 1
        return j >= 0 and self.pens[j] <= pen

    def add(self, lat: float, pen: float) -> None:
        if self.beats(lat, pen):
            return
        j = bisect.bisect_left(self.lats, lat)
        end = j
        while end < len(self.lats) and self.pens[end] >= pen:
            end += 1  # points the new one beats
        self.lats[j:end] = [lat]
        self.pens[j:end] = [pen]


def _undominated(states: dict[int, list[_Node]]) -> dict[int, list[_Node]]:
    """Drop every entry that an entry of *fewer* bytes beats (or ties) on latency and penalty: what it
    can become, that one becomes as well with the same later options, at fewer bytes."""
    stairs = _Staircase()
    out: dict[int, list[_Node]] = {}
    for nb in sorted(states):
        kept = [n for n in states[nb] if not stairs.beats(n[0], n[1])]
        if kept:
            out[nb] = kept
            for n in kept:
                stairs.add(n[0], n[1])
    return out


def _layer_options(model: PerfModel, metric: str, schedule: tuple[int, int, str], layer: int,
                   formats: Sequence[str | None]) -> list[tuple[int, str | None, int, float, float]]:
    """A layer's (slots, format, bytes, latency, penalty) options, less those another option beats
    on all three (fewer or as many bytes, latency and penalty), by bytes."""
    interval, swaps, strategy = schedule
    acc = model.accuracy[metric][strategy]
    k, e = model.top_k[layer], model.num_experts[layer]
    opts = [(s, f, s * model.layer_bytes(layer, f),
             model.latency.layer_s(layer, s, e, interval, swaps, f), acc.layer_penalty(layer, s, f))
            for f in formats for s in range(k, e + 1)]
    opts.sort(key=lambda o: (o[2], o[3], o[4]))
    stairs = _Staircase()
    kept = []
    for o in opts:
        if not stairs.beats(o[3], o[4]):
            kept.append(o)
            stairs.add(o[3], o[4])
    return kept


def _states(model: PerfModel, metric: str, schedule: tuple[int, int, str], cap: int,
            fronts: bool, formats: Sequence[str | None] | None = None,
            lat_cap: float = math.inf, pen_cap: float = math.inf) -> dict[int, list[_Node]]:
    """Exact bytes used -> the configurations worth keeping, for one schedule ``(I, s, strategy)``.

    ``fronts``: the Pareto front of (latency of the layers, additive penalty), exact under a latency
    budget; otherwise only the lexicographic best (penalty, then latency), exact without one (both
    orders survive adding the same layer's option to every entry of a state). ``lat_cap``: drop
    entries whose layers already take longer (a layer never takes negative time); ``pen_cap``: drop
    entries whose additive penalty already reaches it (a layer never adds a negative penalty).
    """
    fmts = list(formats) if formats is not None else model.formats
    states: dict[int, list[_Node]] = {0: [(0.0, 0.0, -1, None, None)]}
    for i in range(model.num_layers):
        options = _layer_options(model, metric, schedule, i, fmts)
        if fronts:
            nxt: dict[int, list[_Node]] = {}
            for used, front in states.items():
                for s, f, ob, olat, open_ in options:
                    nb = used + ob
                    if nb > cap:
                        break  # options are by bytes
                    nxt.setdefault(nb, []).extend((n[0] + olat, n[1] + open_, s, f, n) for n in front
                                                  if n[0] + olat <= lat_cap and n[1] + open_ < pen_cap)
            states = _undominated({nb: _pareto(nodes) for nb, nodes in nxt.items()})
            continue
        best: dict[int, _Node] = {}  # the lexicographic best (penalty, latency) per byte total
        for used, (node,) in states.items():
            lat0, pen0 = node[0], node[1]
            for s, f, ob, olat, open_ in options:
                nb = used + ob
                if nb > cap:
                    break
                pen, lat = pen0 + open_, lat0 + olat
                old = best.get(nb)
                if old is None or pen < old[1] or (pen == old[1] and lat < old[0]):
                    best[nb] = (lat, pen, s, f, node)
        states = _undominated({nb: [n] for nb, n in best.items()})
    return states


def _additive_cap(acc: Any, factor: float, limit: float) -> float:
    """An additive penalty ``A`` from which on ``g(A) * factor > limit`` (``g`` non-decreasing): an
    entry that reaches it cannot end within ``limit``. inf when none is found."""
    if not math.isfinite(limit) or factor <= 0:
        return math.inf
    hi = 1.0
    while acc.calibrate(hi) * factor <= limit:
        hi *= 2.0
        if hi > 1e12:
            return math.inf
    lo = 0.0
    for _ in range(60):  # g(lo) * factor <= limit < g(hi) * factor
        mid = 0.5 * (lo + hi)
        if acc.calibrate(mid) * factor <= limit:
            lo = mid
        else:
            hi = mid
    return hi


def _slots_of(node: _Node) -> tuple[tuple[int, ...], tuple[str | None, ...]]:
    """(slots, formats) per layer along the path to ``node``."""
    slots: list[int] = []
    fmts: list[str | None] = []
    n: _Node | None = node
    while n is not None and n[2] >= 0:
        slots.append(n[2])
        fmts.append(n[3])
        n = n[4]
    return tuple(reversed(slots)), tuple(reversed(fmts))


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
    best slots and formats); with one, among every configuration on the fronts.
    """
    start = time.perf_counter()
    space = space or SearchSpace()
    formats = space.layer_formats(model)
    _check_memory(model, memory_budget, formats)
    fronts = latency_budget is not None
    lat_cap = math.inf if latency_budget is None else latency_budget - model.latency.base_s

    def run(cap: int, lat_cap: float, fronts: bool = fronts, limit: float = math.inf
            ) -> tuple[list[tuple[float, float, int, int, Config]], list[tuple[int, float]], int]:
        cands: list[tuple[float, float, int, int, Config]] = []
        seen: list[tuple[int, float]] = []
        looked = 0
        for g, sched in enumerate(_schedules(model, space)):
            interval, swaps, strategy = sched
            acc = model.accuracy[metric][strategy]
            factor = acc.scale(interval, swaps)
            pen_cap = _additive_cap(acc, factor, limit)
            for nb, nodes in _states(model, metric, sched, cap, fronts, formats, lat_cap, pen_cap).items():
                for n in nodes:
                    looked += 1
                    lat = model.latency.base_s + n[0]
                    seen.append((nb, lat))
                    if nb > memory_budget or (fronts and lat > latency_budget):
                        continue
                    cands.append((acc.calibrate(n[1]) * factor, lat, nb, g, _config(*_slots_of(n), sched)))
        return cands, seen, looked

    limit = math.inf
    if fronts:
        # an incumbent: the best entry per byte total without the latency budget, kept where it meets
        # it; no configuration whose penalty is beyond the tolerance of it can be picked (branch and bound)
        fast, _, _ = run(memory_budget, math.inf, fronts=False)
        feasible = [c[0] for c in fast if c[1] <= latency_budget]
        if feasible:
            limit = min(feasible) * (1.0 + tolerance) + 1e-15
    cands, _, looked = run(memory_budget, lat_cap, limit=limit)
    if not cands:
        assert latency_budget is not None
        # again at every memory total and latency, to name the nearest feasible budgets
        cap = max(model.memory(model.num_experts, [f] * model.num_layers) for f in formats)
        _, seen, _ = run(cap, math.inf)
        raise _infeasible_latency(model, memory_budget, latency_budget, seen)
    pen, _, nb, _, cfg = _pick(cands, tolerance)
    assert model.memory(cfg.slots, cfg.formats()) == nb <= memory_budget
    return Result(cfg, model.predict(cfg), pen, "dp", looked, time.perf_counter() - start)


# ------------------------------------------------------------------------------------ exhaustive
def space_size(model: PerfModel, space: SearchSpace | None = None) -> int:
    space = space or SearchSpace()
    per_layer = len(space.layer_formats(model))
    return math.prod((e - k + 1) * per_layer for k, e in zip(model.top_k, model.num_experts, strict=True)) \
        * len(_schedules(model, space))


def search_exhaustive(model: PerfModel, memory_budget: int, latency_budget: float | None = None,
                      space: SearchSpace | None = None, metric: str = "kl", tolerance: float = 0.0,
                      limit: int = EXHAUSTIVE_LIMIT) -> Result:
    """Every configuration, each predicted through :meth:`PerfModel.predict`'s own code path."""
    start = time.perf_counter()
    space = space or SearchSpace()
    formats = space.layer_formats(model)
    _check_memory(model, memory_budget, formats)
    size = space_size(model, space)
    if size > limit:
        raise BudgetError(f"the space has {size} configurations, more than {limit} to enumerate: use --method dp")
    ranges = [[(s, f) for f in formats for s in range(k, e + 1)]
              for k, e in zip(model.top_k, model.num_experts, strict=True)]
    cands: list[tuple[float, float, int, int, Config]] = []
    seen: list[tuple[int, float]] = []
    for g, sched in enumerate(_schedules(model, space)):
        for choice in itertools.product(*ranges):
            cfg = _config([s for s, _ in choice], [f for _, f in choice], sched)
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
Genome = tuple[tuple[int, ...], tuple[str | None, ...], int]  # slots, formats, schedule index


def _used(model: PerfModel, slots: Sequence[int], fmts: Sequence[str | None]) -> int:
    return sum(s * model.layer_bytes(i, f) for i, (s, f) in enumerate(zip(slots, fmts, strict=True)))


def _repair(model: PerfModel, slots: list[int], fmts: list[str | None], memory_budget: int, metric: str,
            strategy: str, formats: Sequence[str | None]) -> tuple[list[int], list[str | None]]:
    """Drop a slot, or move a layer to a more compact format, where it costs least penalty per byte
    saved, until the configuration fits."""
    acc = model.accuracy[metric][strategy]
    used = _used(model, slots, fmts)
    while used > memory_budget:
        best = None
        for i, (s, f, k) in enumerate(zip(slots, fmts, model.top_k, strict=True)):
            here = acc.layer_penalty(i, s, f)
            moves = [(s - 1, f)] if s > k else []
            moves += [(s, g) for g in formats if model.layer_bytes(i, g) < model.layer_bytes(i, f)]
            for ns, nf in moves:
                saved = s * model.layer_bytes(i, f) - ns * model.layer_bytes(i, nf)
                cost = (acc.layer_penalty(i, ns, nf) - here) / saved
                if best is None or cost < best[0]:
                    best = (cost, i, ns, nf, saved)
        assert best is not None  # the memory budget is >= the minimum
        _, i, slots[i], fmts[i], saved = best
        used -= saved
    return slots, fmts


def search_ga(model: PerfModel, memory_budget: int, latency_budget: float | None = None,
              space: SearchSpace | None = None, metric: str = "kl", tolerance: float = 0.0,
              population: int = 48, generations: int = 150, seed: int = 0) -> Result:
    """A genetic algorithm over (slots, formats, schedule), as the SwapMoE paper's planner (formats added)."""
    start = time.perf_counter()
    space = space or SearchSpace()
    formats = space.layer_formats(model)
    _check_memory(model, memory_budget, formats)
    schedules = _schedules(model, space)
    rng = random.Random(seed)
    L = model.num_layers
    cache: dict[Genome, tuple[float, float, int]] = {}

    def evaluate(ind: Genome) -> tuple[float, float, int]:
        if ind not in cache:
            cache[ind] = _objective(model, _config(ind[0], ind[1], schedules[ind[2]]), metric)
        return cache[ind]

    def fitness(ind: Genome) -> float:
        pen, lat, _ = evaluate(ind)
        over = 0.0 if latency_budget is None else max(0.0, lat - latency_budget) / latency_budget
        return pen + 1e6 * over

    def fix(slots: list[int], fmts: list[str | None], g: int) -> Genome:
        slots, fmts = _repair(model, slots, fmts, memory_budget, metric, schedules[g][2], formats)
        return tuple(slots), tuple(fmts), g

    def random_individual() -> Genome:
        fmts = [rng.choice(formats) for _ in range(L)]
        slots = list(model.top_k)
        used = _used(model, slots, fmts)
        for _ in range(sum(e - k for k, e in zip(model.top_k, model.num_experts, strict=True))):
            i = rng.randrange(L)
            b = model.layer_bytes(i, fmts[i])
            if slots[i] < model.num_experts[i] and used + b <= memory_budget:
                slots[i] += 1
                used += b
        return fix(slots, fmts, rng.randrange(len(schedules)))

    def mutate(ind: Genome) -> Genome:
        slots, fmts, g = list(ind[0]), list(ind[1]), ind[2]
        for _ in range(rng.randint(1, 3)):
            a, b = rng.randrange(L), rng.randrange(L)
            op = rng.random()
            if op < 0.4 and slots[a] > model.top_k[a] and slots[b] < model.num_experts[b]:
                slots[a] -= 1  # move a slot from a to b
                slots[b] += 1
            elif op < 0.6 and slots[a] < model.num_experts[a]:
                slots[a] += 1
            elif op < 0.8 and slots[a] > model.top_k[a]:
                slots[a] -= 1
            else:
                fmts[a] = rng.choice(formats)
        if rng.random() < 0.2:
            g = rng.randrange(len(schedules))
        return fix(slots, fmts, g)

    def crossover(x: Genome, y: Genome) -> Genome:
        pick = [rng.random() < 0.5 for _ in range(L)]  # a layer's slots and format go together
        slots = [a if p else b for a, b, p in zip(x[0], y[0], pick, strict=True)]
        fmts = [a if p else b for a, b, p in zip(x[1], y[1], pick, strict=True)]
        return fix(slots, fmts, x[2] if rng.random() < 0.5 else y[2])

    def tournament(pop: list[Genome]) -> Genome:
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
    for (slots, fmts, g), (pen, lat, nb) in cache.items():
        if nb <= memory_budget and (latency_budget is None or lat <= latency_budget):
            cands.append((pen, lat, nb, g, _config(slots, fmts, schedules[g])))
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
    """The planner-free allocation at the same budget (top-k per layer, then round-robin), in the base
    format."""
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
