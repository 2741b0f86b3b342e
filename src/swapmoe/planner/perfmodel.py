"""The performance model: what a configuration costs and how accurate it is, fitted to a profile.

A *configuration* is ``{slots per MoE layer, precision per MoE layer, update_interval,
swaps_per_update, strategy}``; a layer's precision is one of :data:`swapmoe.quant.FORMATS` that the
profile measured, or ``None``: the format the profile was made in (its *base*). For any
configuration the model predicts

* **expert memory** exactly, by arithmetic: ``sum_l S_l * bytes_per_expert_l(F_l)`` (the runtime's
  slot tensors are exactly ``[S_l, ...]`` in the layer's format, scales included, and a full layer
  keeps its ``E_l`` experts);
* **decode latency per token** at batch 1::

      T = T0 + sum over virtualised layers (S_l < E_l) of
              h                       router hook + Masked Gating
            + c * S_l                 kernels over S_l slots
            + p_l / I                 one update (importance to host, policy) every I tokens
            + r(I, s) * u_l           swaps per token times the cost of one swap on the compute path
          + sum over layers held in a format F other than the base of
              d_F                     dequantising the chosen experts (measured per format)

  with ``T0, h, c`` fitted (non-negative, least absolute deviations) to measured decode steps, ``p_l, u_l`` measured
  directly, and ``r`` the measured swap rate (swaps per token per layer) interpolated in
  ``log(I / s)`` and capped at ``s / I``;
* **accuracy** as a penalty against the full model, KL(full || config) in nats per token or the
  increase of the log-perplexity (mean NLL)::

      penalty = g(A) * rho(I / s),   A = sum_l f_l(S_l) + q_l(F_l),   one model per strategy

  ``f_l(S)`` is layer ``l``'s measured penalty with ``S`` slots while every other layer is full
  (piecewise linear in ``S``, non-increasing, 0 at ``S = E``); ``q_l(F)`` is its measured penalty
  with all its experts resident in format ``F`` while every other layer is full and in the base
  format (0 for the base); ``g`` calibrates the additive sum
  against measured uniform configurations (layers compound: ``g`` is the measured penalty as a
  non-decreasing piecewise-linear function of ``A``, through ``g(0) = 0``); ``rho`` is the
  measured effect of the update rate relative to the reference interval (measured with exchange,
  used for both strategies).

Why ``f + q`` (one run per layer and format, not the ``(slots, format)`` grid per layer): two small
perturbations of one layer's output, masking and rounding, add to first order in KL; the grid
would cost ``|grid| x |formats|`` runs per layer for a second-order term. The profile's held-out
configurations draw a format per layer too, so the table of prediction errors checks the sum.

For a fixed ``(I, s, strategy)`` the penalty is a non-decreasing function of ``A`` and the
latency is a sum over layers: that is what makes an exact knapsack-style search possible
(:mod:`swapmoe.planner.search`). Everything here is pure Python
over literal tables, so it can be tested without a model.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

STRATEGIES = ("exchange", "skip")
METRICS = ("kl", "nll")  # nll: increase of the mean negative log-likelihood (log-perplexity)
STATIC = math.inf  # I / s of a configuration that never swaps (swaps_per_update = 0)
FIELDS = {"kl": "kl", "nll": "nll_delta"}  # metric -> field of a run (nll_delta = nll - nll of the full model)


@dataclass(frozen=True)
class Config:
    slots: tuple[int, ...]
    update_interval: int = 16
    swaps_per_update: int = 1
    strategy: str = "exchange"
    #: the format of each MoE layer (None: the profile's base format); None: the base everywhere
    expert_dtype: tuple[str | None, ...] | None = None

    def formats(self) -> tuple[str | None, ...]:
        """One entry per MoE layer (None: the base format)."""
        return self.expert_dtype if self.expert_dtype is not None else (None,) * len(self.slots)

    def mixed(self) -> bool:
        """Does any layer leave the base format?"""
        return any(f is not None for f in self.formats())

    def key(self) -> str:
        # configurations in the base format keep the keys they had before formats existed (old profiles)
        fmts = f";F={','.join(f or '-' for f in self.formats())}" if self.mixed() else ""
        return (f"S={','.join(map(str, self.slots))};I={self.update_interval};s={self.swaps_per_update};"
                f"{self.strategy}{fmts}")


@dataclass(frozen=True)
class Prediction:
    expert_bytes: int
    decode_s_per_token: float
    kl: float
    nll_delta: float
    perplexity: float

    def penalty(self, metric: str) -> float:
        return self.kl if metric == "kl" else self.nll_delta


def interp(x: float, points: Sequence[tuple[float, float]], extrapolate: bool = False) -> float:
    """Piecewise-linear interpolation through ``points`` (sorted by x), constant beyond the ends
    (``extrapolate``: the last segment continues to the right)."""
    if not points:
        raise ValueError("no points to interpolate")
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if extrapolate and len(points) >= 2:
        (x0, y0), (x1, y1) = points[-2], points[-1]
        if x1 > x0:
            return y1 + (y1 - y0) * (x - x1) / (x1 - x0)
    return points[-1][1]


def effective_interval(update_interval: int, swaps_per_update: int) -> float:
    """Tokens per allowed swap: ``I / s`` (inf when the resident set never moves)."""
    return STATIC if swaps_per_update <= 0 else update_interval / swaps_per_update


@dataclass(frozen=True)
class AccuracyModel:
    """Penalty of a configuration for one metric and strategy (see the module docstring)."""

    layer_points: list[list[tuple[int, float]]]  # per layer: (S, f_l(S)), including (E_l, 0)
    compound: list[tuple[float, float]] = field(default_factory=lambda: [(0.0, 0.0), (1.0, 1.0)])  # (A, g(A))
    interval: list[tuple[float, float]] = field(default_factory=lambda: [(0.0, 1.0)])  # (log2 I/s, rho)
    static: float = 1.0  # rho when swaps_per_update = 0
    format_points: list[dict[str, float]] = field(default_factory=list)  # per layer: format -> q_l(F)

    def layer_penalty(self, layer: int, slots: int, fmt: str | None = None) -> float:
        """``f_l(S) + q_l(F)``: the layer's share of the additive penalty."""
        q = 0.0 if fmt is None else self.format_points[layer][fmt]
        return interp(slots, self.layer_points[layer]) + q

    def additive(self, slots: Sequence[int], formats: Sequence[str | None] | None = None) -> float:
        fmts = formats if formats is not None else [None] * len(slots)
        return sum(self.layer_penalty(i, s, f) for i, (s, f) in enumerate(zip(slots, fmts, strict=True)))

    def calibrate(self, additive: float) -> float:
        """``g``: the penalty of the reference schedule for an additive sum ``A`` (non-decreasing)."""
        return interp(additive, self.compound, extrapolate=True)

    def scale(self, update_interval: int, swaps_per_update: int) -> float:
        """``rho``: the factor on ``g(A)`` of the schedule."""
        i_eff = effective_interval(update_interval, swaps_per_update)
        return self.static if i_eff == STATIC else interp(math.log2(i_eff), self.interval)

    def penalty(self, slots: Sequence[int], update_interval: int, swaps_per_update: int,
                formats: Sequence[str | None] | None = None) -> float:
        return self.calibrate(self.additive(slots, formats)) * self.scale(update_interval, swaps_per_update)


@dataclass(frozen=True)
class LatencyModel:
    """Decode seconds per token at batch 1 (see the module docstring)."""

    base_s: float  # T0: every expert resident, no hooks
    per_layer_s: float  # h: per virtualised layer
    per_slot_s: float  # c: per slot of a virtualised layer
    policy_s: list[float]  # p_l: one update of layer l without a swap
    swap_s: list[float]  # u_l: one swap of layer l on the compute path (a copy on CPU; enqueueing on CUDA)
    swap_rate: list[tuple[float, float]] = field(default_factory=list)  # (log2 I/s, swaps/token/layer)
    format_s: dict[str, float] = field(default_factory=dict)  # d_F: per layer held in F instead of the base
    #: per format and layer, u_l's factor: the ratio of bytes copied where a swap's cost is a copy
    #: (CPU, synchronous), 1 where it is the host time of an asynchronous submit
    format_swap_scale: dict[str, list[float]] = field(default_factory=dict)

    def rate(self, update_interval: int, swaps_per_update: int) -> float:
        """Swaps per token of one virtualised layer."""
        if swaps_per_update <= 0:
            return 0.0
        cap = swaps_per_update / update_interval
        if not self.swap_rate:
            return cap  # nothing measured: assume every allowed swap happens
        return min(cap, interp(math.log2(update_interval / swaps_per_update), self.swap_rate))

    def layer_s(self, layer: int, slots: int, num_experts: int, update_interval: int, swaps_per_update: int,
                fmt: str | None = None) -> float:
        """Latency a layer adds at ``slots`` slots in ``fmt`` (0 when it keeps all its experts in the base)."""
        t = 0.0 if fmt is None else self.format_s.get(fmt, 0.0)
        if slots >= num_experts:
            return t
        t += self.per_layer_s + self.per_slot_s * slots
        if swaps_per_update > 0:
            scale = 1.0 if fmt is None else self.format_swap_scale.get(fmt, [1.0] * (layer + 1))[layer]
            t += self.policy_s[layer] / update_interval
            t += self.rate(update_interval, swaps_per_update) * self.swap_s[layer] * scale
        return t


@dataclass(frozen=True)
class PerfModel:
    """Memory, latency and accuracy of any configuration of one model on one machine."""

    expert_bytes: list[int]
    num_experts: list[int]
    top_k: list[int]
    latency: LatencyModel
    accuracy: dict[str, dict[str, AccuracyModel]]  # metric -> strategy -> model
    nll_full: float = 0.0  # mean NLL of the full model on the calibration text
    meta: dict[str, Any] = field(default_factory=dict)
    #: bytes of one expert per layer in each format other than the base that the profile measured
    format_bytes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.expert_bytes)

    @property
    def formats(self) -> list[str | None]:
        """Formats a layer may take: the base (None), then each measured one."""
        return [None, *self.format_bytes]

    def layer_bytes(self, layer: int, fmt: str | None = None) -> int:
        """Bytes of one expert of ``layer`` in ``fmt`` (None: the base format)."""
        if fmt is None:
            return self.expert_bytes[layer]
        if fmt not in self.format_bytes:
            raise ValueError(f"format {fmt!r} was not profiled (profiled: "
                             f"{', '.join(self.format_bytes) or 'only the base format'})")
        return self.format_bytes[fmt][layer]

    @property
    def total_bytes(self) -> int:
        """All experts in the base format."""
        return sum(b * e for b, e in zip(self.expert_bytes, self.num_experts, strict=True))

    @property
    def minimum_bytes(self) -> int:
        """Top-k experts per layer in each layer's most compact measured format."""
        return sum(k * min(self.layer_bytes(i, f) for f in self.formats) for i, k in enumerate(self.top_k))

    def memory(self, slots: Sequence[int], formats: Sequence[str | None] | None = None) -> int:
        """Device bytes of expert weights, exactly as the runtime allocates them."""
        self.check(slots)
        fmts = formats if formats is not None else [None] * len(slots)
        return sum(s * self.layer_bytes(i, f) for i, (s, f) in enumerate(zip(slots, fmts, strict=True)))

    def fraction(self, expert_bytes: int) -> float:
        return expert_bytes / self.total_bytes

    @property
    def strategies(self) -> list[str]:
        """Strategies the accuracy model knows (those profiled)."""
        return [s for s in STRATEGIES if all(s in by for by in self.accuracy.values())]

    def check(self, slots: Sequence[int]) -> None:
        if len(slots) != self.num_layers:
            raise ValueError(f"{len(slots)} slot counts for {self.num_layers} MoE layers")
        for i, (s, k, e) in enumerate(zip(slots, self.top_k, self.num_experts, strict=True)):
            if not k <= s <= e:
                raise ValueError(f"layer {i}: {s} slots is outside [top-k={k}, {e}]")

    def decode_s(self, config: Config) -> float:
        return self.latency.base_s + sum(
            self.latency.layer_s(i, s, e, config.update_interval, config.swaps_per_update, f)
            for i, (s, e, f) in enumerate(zip(config.slots, self.num_experts, config.formats(), strict=True))
        )

    def penalty(self, config: Config, metric: str = "kl") -> float:
        self.check(config.slots)
        for f in config.formats():
            if f is not None:
                self.layer_bytes(0, f)  # a format the profile did not measure: a clear error
        if config.strategy not in self.accuracy[metric]:
            raise ValueError(f"strategy {config.strategy!r} was not profiled (profiled: {', '.join(self.strategies)})")
        acc = self.accuracy[metric][config.strategy]
        return acc.penalty(config.slots, config.update_interval, config.swaps_per_update, config.formats())

    def predict(self, config: Config) -> Prediction:
        nll = self.penalty(config, "nll") if "nll" in self.accuracy else float("nan")
        return Prediction(
            expert_bytes=self.memory(config.slots, config.formats()),
            decode_s_per_token=self.decode_s(config),
            kl=self.penalty(config, "kl") if "kl" in self.accuracy else float("nan"),
            nll_delta=nll,
            perplexity=math.exp(self.nll_full + nll) if not math.isnan(nll) else float("nan"),
        )


# --------------------------------------------------------------------------------------------- fitting
def _layer_curves(profile: dict[str, Any], metric: str, strategy: str) -> list[list[tuple[int, float]]]:
    model = profile["model"]
    num, runs = model["num_experts"], profile["runs"]
    points: list[dict[int, float]] = [{e: 0.0} for e in num]
    for r in runs.values():
        if r.get("role") != "layer" or r.get("strategy") != strategy:
            continue
        short = [i for i, (s, e) in enumerate(zip(r["slots"], num, strict=True)) if s < e]
        if len(short) == 1:
            points[short[0]][r["slots"][short[0]]] = _metric(r, metric)
    curves = []
    for pts in points:
        xs = sorted(pts)
        ys = [pts[x] for x in xs]
        for j in range(len(ys) - 2, -1, -1):  # fewer slots never cost less: non-increasing in S
            ys[j] = max(ys[j], ys[j + 1])
        curves.append(list(zip(xs, ys, strict=True)))
    return curves


def _metric(r: dict[str, Any], metric: str) -> float:
    return max(0.0, float(r[FIELDS[metric]]))


def _precision_runs(profile: dict[str, Any]) -> dict[str, dict[int, dict[str, Any]]]:
    """format -> layer -> the run with that layer alone in that format (all slots resident), for the
    formats measured on every MoE layer (a format measured on some layers only cannot be planned)."""
    num = profile["model"]["num_experts"]
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for r in profile["runs"].values():
        fmts = r.get("expert_dtype")
        if r.get("role") != "precision" or not fmts:
            continue
        moved = [(i, f) for i, f in enumerate(fmts) if f is not None]
        if len(moved) == 1 and list(r["slots"]) == list(num):
            found.setdefault(moved[0][1], {})[moved[0][0]] = r
    return {f: by for f, by in found.items() if len(by) == len(num)
            and f in profile["model"].get("format_expert_bytes", {})}


def _format_points(profile: dict[str, Any], metric: str) -> list[dict[str, float]]:
    """Per layer: format -> ``q_l(F)``, the layer's penalty with all its experts in ``F``."""
    runs = _precision_runs(profile)
    return [{f: _metric(by[i], metric) for f, by in runs.items()} for i in range(len(profile["model"]["num_experts"]))]


def with_deltas(profile: dict[str, Any]) -> dict[str, Any]:
    """The profile with ``nll_delta`` (NLL minus the full model's) on every run."""
    full = next((r for r in profile["runs"].values() if r.get("role") == "full"), None)
    if full is None:
        raise ValueError("the profile has no run of the full model")
    runs = {k: {**r, "nll_delta": r["nll"] - full["nll"]} for k, r in profile["runs"].items()}
    return {**profile, "runs": runs}


def fit_accuracy(profile: dict[str, Any], metric: str, strategy: str = "exchange") -> AccuracyModel:
    """Fit :class:`AccuracyModel` for ``metric`` and ``strategy`` from a profile's runs (roles: layer,
    uniform, interval, static); the runs need ``nll_delta`` (:func:`with_deltas`). The interval
    correction comes from runs of this strategy, if any (the profile measures it with exchange)."""
    ref_i = profile["grid"]["reference_interval"]
    runs = [r for r in profile["runs"].values() if r.get("strategy") == strategy]
    partial = AccuracyModel(_layer_curves(profile, metric, strategy))
    uniform = [r for r in runs if r.get("role") == "uniform" and r.get("update_interval") == ref_i
               and r.get("swaps_per_update") == 1]
    compound = [(0.0, 0.0)] + sorted((partial.additive(r["slots"]), _metric(r, metric)) for r in uniform)
    for j in range(1, len(compound)):  # g is non-decreasing: more additive penalty never measures less
        compound[j] = (compound[j][0], max(compound[j][1], compound[j - 1][1]))
    if len(compound) == 1:
        compound.append((1.0, 1.0))  # nothing to calibrate with: g(A) = A

    mid = tuple(profile["grid"]["interval_slots"])
    ref = next((r for r in uniform if tuple(r["slots"]) == mid), None)
    interval = [(0.0, 1.0)]
    static = 1.0
    if ref is not None and _metric(ref, metric) > 1e-12:
        base = _metric(ref, metric)
        interval = [(math.log2(ref_i), 1.0)]
        for r in runs:
            if tuple(r["slots"]) != mid:
                continue
            if r.get("role") == "interval":
                interval.append((math.log2(effective_interval(r["update_interval"], r["swaps_per_update"])),
                                 _metric(r, metric) / base))
            elif r.get("role") == "static":
                static = _metric(r, metric) / base
        interval.sort()
    return AccuracyModel(partial.layer_points, compound, interval, static, _format_points(profile, metric))


def _lstsq_nonneg(rows: list[list[float]], ys: list[float], weights: list[float] | None = None) -> list[float]:
    """Weighted least squares with non-negative coefficients (active sets enumerated: 3 unknowns)."""
    import itertools

    n = len(rows[0])
    w = weights or [1.0] * len(rows)
    sw = [math.sqrt(x) for x in w]
    wrows = [[a * s for a in row] for row, s in zip(rows, sw, strict=True)]
    wys = [y * s for y, s in zip(ys, sw, strict=True)]
    best: tuple[float, list[float]] | None = None
    for mask in itertools.product((True, False), repeat=n):
        cols = [j for j in range(n) if mask[j]]
        if not cols:
            continue
        coef = _solve([[row[j] for j in cols] for row in wrows], wys)
        if coef is None or any(c < 0 for c in coef):
            continue
        full = [0.0] * n
        for j, c in zip(cols, coef, strict=True):
            full[j] = c
        err = sum((sum(a * b for a, b in zip(row, full, strict=True)) - y) ** 2 for row, y in zip(wrows, wys, strict=True))
        if best is None or err < best[0]:
            best = (err, full)
    return best[1] if best is not None else [0.0] * n


def robust_fit(rows: list[list[float]], ys: list[float], iterations: int = 30) -> list[float]:
    """Non-negative least *absolute* deviations by iteratively reweighted least squares.

    Timings on a shared machine have outliers (another process takes the cores for a while); an L1
    fit follows the typical measurement instead of the stalled one.
    """
    coef = _lstsq_nonneg(rows, ys)
    scale = max(1e-12, 1e-3 * (sum(abs(y) for y in ys) / len(ys)))
    for _ in range(iterations):
        res = [abs(sum(a * b for a, b in zip(row, coef, strict=True)) - y) for row, y in zip(rows, ys, strict=True)]
        coef = _lstsq_nonneg(rows, ys, [1.0 / max(r, scale) for r in res])
    return coef


def _solve(rows: list[list[float]], ys: list[float]) -> list[float] | None:
    """Normal equations by Gaussian elimination (a handful of unknowns)."""
    n = len(rows[0])
    a = [[sum(r[i] * r[j] for r in rows) for j in range(n)] + [sum(r[i] * y for r, y in zip(rows, ys, strict=True))]
         for i in range(n)]
    for c in range(n):
        piv = max(range(c, n), key=lambda r: abs(a[r][c]))
        if abs(a[piv][c]) < 1e-30:
            return None
        a[c], a[piv] = a[piv], a[c]
        for r in range(n):
            if r != c:
                f = a[r][c] / a[c][c]
                a[r] = [x - f * y for x, y in zip(a[r], a[c], strict=True)]
    return [a[i][n] / a[i][i] for i in range(n)]


def fit_latency(profile: dict[str, Any]) -> LatencyModel:
    """Fit :class:`LatencyModel` from the profile's timings and the decode steps of its runs."""
    model, timing = profile["model"], profile["timing"]
    num = model["num_experts"]
    async_swaps = timing.get("async_swaps", False)
    swap_s = timing["update_submit_s"] if async_swaps else timing["update_s"]
    policy_s = timing["policy_s"]
    rates: dict[float, list[float]] = {}
    for r in profile["runs"].values():
        if r.get("decode_swaps_per_token") is None or r.get("swaps_per_update", 0) <= 0:
            continue
        if r.get("role") in ("interval", "uniform") and r.get("strategy") == "exchange":
            x = math.log2(effective_interval(r["update_interval"], r["swaps_per_update"]))
            rates.setdefault(x, []).append(float(r["decode_swaps_per_token"]))
    swap_rate = sorted((x, sum(v) / len(v)) for x, v in rates.items())
    partial = LatencyModel(0.0, 0.0, 0.0, policy_s, swap_s, swap_rate)
    rows, ys = [], []
    for r in profile["runs"].values():
        t = r.get("decode_s_per_token")
        if t is None or r.get("role") in ("holdout", "precision"):  # precision runs: d_F below
            continue
        virt = [(i, s) for i, (s, e) in enumerate(zip(r["slots"], num, strict=True)) if s < e]
        known = sum(partial.layer_s(i, s, num[i], r["update_interval"], r["swaps_per_update"]) for i, s in virt)
        rows.append([1.0, float(len(virt)), float(sum(s for _, s in virt))])
        ys.append(t - known)
    if not rows:
        raise ValueError("the profile has no decode measurements to fit the latency model to")
    if len({tuple(r) for r in rows}) < 3:  # too few distinct configurations for h and c: only T0 and h
        t0, h, _ = robust_fit([[r[0], r[1], 0.0] for r in rows], ys)
        c = 0.0
    else:
        t0, h, c = robust_fit(rows, ys)
    format_s: dict[str, float] = {}
    scale: dict[str, list[float]] = {}
    for f in _precision_runs(profile):
        # d_F: the median over layers of the measured difference of one MoE block's decode time
        # (alternating rounds, see measure.time_formats); whole decode runs minutes apart drift more
        # than this on a shared CPU
        deltas = timing.get("format_decode_delta_s", {}).get(f, [])
        format_s[f] = max(0.0, statistics.median(deltas)) if deltas else 0.0
        fb = model["format_expert_bytes"][f]
        scale[f] = [1.0 if async_swaps else b / base for b, base in zip(fb, model["expert_bytes"], strict=True)]
    return LatencyModel(t0, h, c, policy_s, swap_s, swap_rate, format_s, scale)


def fit(profile: dict[str, Any]) -> PerfModel:
    """The performance model of a profile (as written by ``swapmoe profile``)."""
    model = profile["model"]
    profile = with_deltas(profile)
    full = next(r for r in profile["runs"].values() if r.get("role") == "full")
    strategies = [st for st in STRATEGIES if any(r.get("role") == "layer" and r.get("strategy") == st
                                                 for r in profile["runs"].values())]
    if "exchange" not in strategies:
        raise ValueError("the profile has no per-layer runs with the exchange strategy")
    accuracy: dict[str, dict[str, AccuracyModel]] = {}
    for m in METRICS:
        ex = fit_accuracy(profile, m, "exchange")
        accuracy[m] = {"exchange": ex}
        for st in strategies:
            if st != "exchange":
                own = fit_accuracy(profile, m, st)
                measured = any(r.get("role") in ("interval", "static") and r.get("strategy") == st
                               for r in profile["runs"].values())
                accuracy[m][st] = own if measured else replace(own, interval=ex.interval, static=ex.static)
    return PerfModel(
        expert_bytes=list(model["expert_bytes"]), num_experts=list(model["num_experts"]),
        top_k=list(model["top_k"]), latency=fit_latency(profile), accuracy=accuracy,
        nll_full=float(full["nll"]), meta=dict(profile.get("meta", {})),
        format_bytes={f: list(model["format_expert_bytes"][f]) for f in _precision_runs(profile)},
    )


def config_of(run: dict[str, Any]) -> Config:
    fmts = run.get("expert_dtype")
    return Config(tuple(run["slots"]), run["update_interval"], run["swaps_per_update"], run["strategy"],
                  tuple(fmts) if fmts else None)


def prediction_errors(model: PerfModel, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Predicted against measured for each run (e.g. the held-out configurations of a profile)."""
    rows = []
    for r in runs:
        cfg = config_of(r)
        p = model.predict(cfg)
        rows.append({
            "config": cfg.key(),
            "memory_predicted": p.expert_bytes, "memory_measured": r.get("expert_bytes"),
            "decode_predicted": p.decode_s_per_token, "decode_measured": r.get("decode_s_per_token"),
            "kl_predicted": p.kl, "kl_measured": r.get("kl"),
            "ppl_predicted": p.perplexity, "ppl_measured": math.exp(r["nll"]),
        })
    return rows


def _rel(pred: float | None, meas: float | None) -> float | None:
    if pred is None or meas is None or meas == 0:
        return None
    return (pred - meas) / abs(meas)


def error_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per configuration, then mean absolute relative errors."""
    head = ["configuration", "memory pred/meas (B)", "decode ms pred/meas", "err", "KL pred/meas", "err",
            "ppl pred/meas", "err"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sums: dict[str, list[float]] = {"mem": [], "lat": [], "kl": [], "ppl": []}

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:+.1f}%"

    for r in rows:
        errs = {
            "mem": _rel(r["memory_predicted"], r["memory_measured"]),
            "lat": _rel(r["decode_predicted"], r["decode_measured"]),
            "kl": _rel(r["kl_predicted"], r["kl_measured"]),
            "ppl": _rel(r["ppl_predicted"], r["ppl_measured"]),
        }
        for k, v in errs.items():
            if v is not None:
                sums[k].append(abs(v))
        lat_m = r["decode_measured"]
        out.append("| " + " | ".join([
            f"`{r['config']}`", f"{r['memory_predicted']}/{r['memory_measured']}",
            f"{1e3 * r['decode_predicted']:.2f}/" + ("-" if lat_m is None else f"{1e3 * lat_m:.2f}"), pct(errs["lat"]),
            f"{r['kl_predicted']:.4f}/{r['kl_measured']:.4f}", pct(errs["kl"]),
            f"{r['ppl_predicted']:.3f}/{r['ppl_measured']:.3f}", pct(errs["ppl"]),
        ]) + " |")

    def mean(v: list[float]) -> str:
        return "-" if not v else f"{100 * sum(v) / len(v):.1f}%"

    out.append(f"| **mean absolute error** | memory {mean(sums['mem'])} | | {mean(sums['lat'])} | | {mean(sums['kl'])} | "
               f"| {mean(sums['ppl'])} |")
    return "\n".join(out) + "\n"
