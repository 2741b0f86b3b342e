"""The performance model fitted to a literal profile: exact memory, the fitted points reproduced,
latency coefficients recovered despite a stalled measurement."""

from __future__ import annotations

import math

import pytest

from swapmoe.planner.perfmodel import (
    Config,
    LatencyModel,
    error_table,
    fit,
    interp,
    prediction_errors,
    robust_fit,
)

E, K, B = 4, 1, 1000  # experts per layer, top-k, bytes per expert
REF_I = 16
T0, H, C = 0.010, 0.0005, 0.0001  # the latency the literal profile is generated from
POLICY, SWAP = [2e-4, 3e-4], [1e-3, 2e-3]
RATE = {1: 0.5, 4: 0.15, 16: 0.05, 64: 0.01}  # swaps per token per layer by I


def decode(slots, interval, swaps):
    t = T0
    for i, s in enumerate(slots):
        if s < E:
            t += H + C * s
            if swaps:
                t += POLICY[i] / interval + min(swaps / interval, RATE[interval // swaps]) * SWAP[i]
    return t


def run(role, slots, kl, nll, interval=REF_I, swaps=1, strategy="exchange", timed=True):
    r = {"role": role, "slots": list(slots), "update_interval": interval, "swaps_per_update": swaps,
         "strategy": strategy, "kl": kl, "nll": nll, "expert_bytes": B * sum(slots)}
    if timed:
        r["decode_s_per_token"] = decode(slots, interval, swaps)
        r["decode_swaps_per_token"] = RATE[interval // swaps] if swaps else 0.0
    return r


def literal_profile():
    runs = [
        run("full", (4, 4), 0.0, 2.0),
        run("layer", (1, 4), 0.30, 2.20), run("layer", (2, 4), 0.10, 2.08), run("layer", (3, 4), 0.12, 2.02),
        run("layer", (4, 1), 0.60, 2.50), run("layer", (4, 2), 0.20, 2.15), run("layer", (4, 3), 0.05, 2.04),
        run("uniform", (1, 1), 1.08, 2.90), run("uniform", (2, 2), 0.36, 2.25), run("uniform", (3, 3), 0.17, 2.06),
        run("static", (2, 2), 0.72, 2.50, swaps=0),
        run("interval", (2, 2), 0.30, 2.20, interval=1), run("interval", (2, 2), 0.33, 2.22, interval=4),
        run("interval", (2, 2), 0.45, 2.30, interval=64),
        run("layer", (1, 4), 0.20, 2.10, strategy="skip", timed=False),
        run("layer", (4, 1), 0.50, 2.40, strategy="skip", timed=False),
        run("uniform", (1, 1), 0.80, 2.70, strategy="skip", timed=False),
        run("uniform", (2, 2), 0.30, 2.20, strategy="skip", timed=False),
        run("holdout", (3, 1), 0.7, 2.6, interval=8, swaps=2),
    ]
    return {
        "version": 1, "meta": {"device": "cpu"},
        "model": {"num_layers": 2, "num_experts": [E, E], "top_k": [K, K], "expert_bytes": [B, B],
                  "total_expert_bytes": 2 * E * B, "minimum_bytes": 2 * K * B},
        "grid": {"reference_interval": REF_I, "interval_slots": [2, 2], "intervals": [1, 4, 16, 64]},
        "timing": {"policy_s": POLICY, "update_s": SWAP, "update_submit_s": [1e-5, 1e-5], "async_swaps": False},
        "runs": {f"{r['role']}:{i}": r for i, r in enumerate(runs)},
    }


def test_memory_is_exact_arithmetic_and_rejects_impossible_slots():
    pm = fit(literal_profile())
    assert pm.memory([3, 1]) == 4 * B and pm.total_bytes == 8 * B and pm.minimum_bytes == 2 * B
    with pytest.raises(ValueError, match="outside"):
        pm.memory([0, 4])
    with pytest.raises(ValueError, match="MoE layers"):
        pm.memory([2])


def test_layer_curves_are_non_increasing_and_zero_when_full():
    acc = fit(literal_profile()).accuracy["kl"]["exchange"]
    assert acc.layer_points[0] == [(1, 0.30), (2, 0.12), (3, 0.12), (4, 0.0)]  # 0.10 at S=2 raised to 0.12
    assert acc.layer_penalty(1, 4) == 0.0 and acc.layer_penalty(1, 2) == 0.20


def test_fitted_configurations_are_reproduced():
    prof = literal_profile()
    pm = fit(prof)
    for r in prof["runs"].values():
        if r["role"] in ("uniform", "interval", "static", "full"):
            cfg = Config(tuple(r["slots"]), r["update_interval"], r["swaps_per_update"], r["strategy"])
            assert pm.penalty(cfg, "kl") == pytest.approx(r["kl"], rel=1e-9, abs=1e-12), r
            assert pm.predict(cfg).perplexity == pytest.approx(math.exp(r["nll"]), rel=1e-9), r


def test_skip_has_its_own_curves_and_borrows_the_interval_correction():
    pm = fit(literal_profile())
    assert pm.strategies == ["exchange", "skip"]
    skip = pm.accuracy["kl"]["skip"]
    assert skip.layer_points[0] == [(1, 0.20), (4, 0.0)] and skip.interval == pm.accuracy["kl"]["exchange"].interval
    ratio = pm.penalty(Config((2, 2), 1, 1, "skip")) / pm.penalty(Config((2, 2), 16, 1, "skip"))
    assert ratio == pytest.approx(0.30 / 0.36)  # exchange's measured effect of I=1 against I=16
    prof = literal_profile()
    for k in [k for k, r in prof["runs"].items() if r["strategy"] == "skip"]:
        del prof["runs"][k]
    assert fit(prof).strategies == ["exchange"]
    with pytest.raises(ValueError, match="not profiled"):
        fit(prof).predict(Config((2, 2), 16, 1, "skip"))


def test_interval_correction_interpolates_in_log_interval_and_swaps_scale_it():
    pm = fit(literal_profile())
    at = {i: pm.penalty(Config((2, 2), i, 1)) for i in (1, 2, 4, 8, 16, 64, 256)}
    assert at[2] == pytest.approx((at[1] + at[4]) / 2) and at[8] == pytest.approx((at[4] + at[16]) / 2)
    assert at[256] == at[64]  # constant beyond the measured range
    assert pm.penalty(Config((2, 2), 8, 2)) == pytest.approx(at[4])  # 2 swaps every 8 tokens ~ 1 every 4


def test_latency_model_recovers_its_coefficients():
    lat = fit(literal_profile()).latency
    assert lat.base_s == pytest.approx(T0, rel=1e-6)
    assert lat.per_layer_s == pytest.approx(H, rel=1e-4) and lat.per_slot_s == pytest.approx(C, rel=1e-4)
    pm = fit(literal_profile())
    for cfg in (Config((3, 1), 8, 2), Config((4, 2), 1, 1), Config((1, 1), 64, 1)):
        assert pm.decode_s(cfg) == pytest.approx(decode(cfg.slots, cfg.update_interval, cfg.swaps_per_update),
                                                 rel=1e-6)


def test_robust_fit_ignores_a_stalled_measurement():
    rows = [[1.0, float(n), float(s)] for n in (0, 1, 2) for s in (1, 3, 5)]
    ys = [T0 + H * r[1] + C * r[2] for r in rows]
    ys[4] *= 5  # another process took the CPU during this one
    t0, h, c = robust_fit(rows, ys)
    assert t0 == pytest.approx(T0, rel=1e-3) and h == pytest.approx(H, rel=1e-2) and c == pytest.approx(C, rel=1e-2)


def test_swap_rate_is_capped_by_what_the_schedule_allows():
    lat = LatencyModel(0.0, 0.0, 0.0, [0.0], [1.0], swap_rate=[(0.0, 0.9), (6.0, 0.9)])
    assert lat.rate(4, 1) == 0.25 and lat.rate(4, 0) == 0.0 and lat.rate(1, 1) == 0.9
    assert LatencyModel(0.0, 0.0, 0.0, [0.0], [1.0]).rate(8, 2) == 0.25  # nothing measured: every allowed swap


def test_prediction_error_table_reports_the_held_out_configuration():
    prof = literal_profile()
    rows = prediction_errors(fit(prof), [r for r in prof["runs"].values() if r["role"] == "holdout"])
    assert rows[0]["memory_predicted"] == rows[0]["memory_measured"] == 4 * B
    table = error_table(rows)
    assert "`S=3,1;I=8;s=2;exchange`" in table and "memory 0.0%" in table


def test_interp():
    pts = [(1.0, 10.0), (3.0, 30.0)]
    assert interp(0.0, pts) == 10.0 and interp(2.0, pts) == 20.0 and interp(5.0, pts) == 30.0
