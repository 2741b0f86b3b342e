"""Precision per MoE layer in the planner: the search over (slots, format) on literal performance
models, profiles made before formats were profiled, and the ``planned`` sweep policy end to end."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from swapmoe.cli import main
from swapmoe.planner.make import make_plan
from swapmoe.planner.perfmodel import AccuracyModel, Config, LatencyModel, PerfModel, fit
from swapmoe.planner.search import SearchSpace, search_dp, search_exhaustive, search_ga
from swapmoe.quant import FORMATS
from tests.planner.test_search import literal_model

ONE = SearchSpace(intervals=(16,), swaps=(1,), strategies=("exchange",), static=False)
SPACE = SearchSpace(intervals=(1, 16), swaps=(1,), strategies=("exchange", "skip"))


def hand_model() -> PerfModel:
    """Two layers of 4 experts (top-1): 100 bytes an expert in the base, 52 in int8, 28 in int4.
    Penalty is additive (g(A) = A, rho = 1), latency flat: the optimum can be worked out by hand."""
    acc = AccuracyModel([[(1, 4.0), (2, 2.0), (3, 1.0), (4, 0.0)], [(1, 1.0), (2, 0.5), (3, 0.2), (4, 0.0)]],
                        format_points=[{"int8": 0.01, "int4": 0.3}, {"int8": 0.02, "int4": 0.05}])
    lat = LatencyModel(0.01, 0.0, 0.0, [0.0, 0.0], [0.0, 0.0])
    return PerfModel([100, 100], [4, 4], [1, 1], lat, {m: {"exchange": acc} for m in ("kl", "nll")},
                     format_bytes={"int8": [52, 52], "int4": [28, 28]})


@pytest.mark.parametrize(("budget", "slots", "formats", "penalty", "used"), [
    # layer 0 (the sensitive one) whole in int8 (208 B, 0.01); the 92 B left hold 3 int4 experts of
    # layer 1 (84 B, 0.2 + 0.05); next best: both whole in int4 (224 B, 0.3 + 0.05)
    (300, (4, 3), ("int8", "int4"), 0.26, 292),
    # both whole in int8 (416 B, 0.03); layer 0 whole in the base leaves one int4 expert for layer 1 (1.05)
    (450, (4, 4), ("int8", "int8"), 0.03, 416),
    # everything fits in the base format: nothing quantised, and the plan names no format
    (800, (4, 4), None, 0.0, 800),
    # the least: one int4 expert per layer
    (56, (1, 1), ("int4", "int4"), 4.0 + 0.3 + 1.0 + 0.05, 56),
])
def test_dp_chooses_the_known_slots_and_precision_per_layer(budget, slots, formats, penalty, used):
    model = hand_model()
    for search in (search_dp, search_exhaustive):
        r = search(model, budget, space=ONE)
        assert r.config.slots == slots and r.config.expert_dtype == formats, search.__name__
        assert r.objective == pytest.approx(penalty)
        assert r.prediction.expert_bytes == used <= budget


def test_formats_can_be_restricted_and_the_minimum_follows():
    model = hand_model()
    r = search_dp(model, 450, space=replace(ONE, formats=(None, "int4")))  # no int8 allowed
    assert set(r.config.formats()) <= {None, "int4"} and r.prediction.expert_bytes <= 450
    # base only: the planner of before (4 + 0 at 500 bytes: layer 0 whole, one slot for layer 1)
    assert search_dp(model, 500, space=replace(ONE, formats=(None,))).config == Config((4, 1), 16, 1, "exchange")
    from swapmoe.errors import BudgetError

    with pytest.raises(BudgetError, match="--memory-budget 200 or more"):
        search_dp(model, 150, space=replace(ONE, formats=(None,)))
    with pytest.raises(BudgetError, match="--memory-budget 56 or more"):
        search_dp(model, 55, space=ONE)


def with_formats(model: PerfModel, seed: int) -> PerfModel:
    """A literal model with two more formats per layer: fewer bytes, some penalty, some latency."""
    rng = random.Random(seed)
    L = model.num_layers
    fb = {"int8": [b // 2 + 3 for b in model.expert_bytes], "int4": [b // 4 + 5 for b in model.expert_bytes]}
    q = [{"int8": rng.uniform(0, 0.05), "int4": rng.uniform(0.05, 0.6)} for _ in range(L)]
    acc = {m: {st: replace(a, format_points=q) for st, a in by.items()} for m, by in model.accuracy.items()}
    lat = replace(model.latency, format_s={"int8": 2e-4, "int4": 3e-4},
                  format_swap_scale={f: [b / base for b, base in zip(fb[f], model.expert_bytes, strict=True)]
                                     for f in fb})
    return replace(model, accuracy=acc, latency=lat, format_bytes=fb)


@pytest.mark.parametrize("seed", range(4))
def test_dp_equals_exhaustive_with_formats_and_keeps_every_budget(seed):
    model = with_formats(literal_model(seed, num_layers=2, num_experts=4), seed)
    total = model.total_bytes
    for frac in (0.15, 0.3, 0.55, 0.9):
        budget = max(int(frac * total), model.minimum_bytes)
        fastest = search_dp(model, budget, space=SPACE).prediction.decode_s_per_token
        for latency in (None, fastest * 0.999, fastest * 1.02):
            try:
                ex = search_exhaustive(model, budget, latency, space=SPACE)
            except Exception as e:  # noqa: BLE001 - both must refuse alike
                with pytest.raises(type(e)):
                    search_dp(model, budget, latency, space=SPACE)
                continue
            dp = search_dp(model, budget, latency, space=SPACE)
            assert dp.objective == pytest.approx(ex.objective, rel=1e-12, abs=1e-15), (frac, latency)
            assert dp.prediction.expert_bytes <= budget
            assert model.memory(dp.config.slots, dp.config.formats()) == dp.prediction.expert_bytes
            if latency is not None:
                assert dp.prediction.decode_s_per_token <= latency
            ga = search_ga(model, budget, latency, space=SPACE, generations=40, seed=seed)
            assert ga.prediction.expert_bytes <= budget and ga.objective >= dp.objective - 1e-12


def test_formats_buy_accuracy_at_a_small_budget():
    """The same budget with formats is never worse than without them, and better where the base
    format cannot hold the sensitive layers (the point of the precision axis)."""
    for seed in range(3):
        model = with_formats(literal_model(seed, num_layers=3, num_experts=5), seed)
        budget = int(0.3 * model.total_bytes)
        base = search_dp(model, budget, space=replace(SPACE, formats=(None,))).objective
        mixed = search_dp(model, budget, space=SPACE).objective
        assert mixed <= base
    assert search_dp(hand_model(), 300, space=ONE).objective < search_dp(
        hand_model(), 300, space=replace(ONE, formats=(None,))).objective


def test_layer_latency_counts_the_format():
    lat = LatencyModel(0.0, 1e-3, 1e-4, [1e-3], [2e-3], [(0.0, 1.0)], format_s={"int4": 5e-4},
                       format_swap_scale={"int4": [0.25]})
    assert lat.layer_s(0, 4, 4, 16, 1) == 0.0  # whole, base: nothing added
    assert lat.layer_s(0, 4, 4, 16, 1, "int4") == pytest.approx(5e-4)  # whole, dequantised
    # virtualised int4: hook + slots + policy + swaps of a quarter of the bytes (a copy on CPU) + dequantising
    want = 1e-3 + 2 * 1e-4 + 1e-3 / 16 + (1 / 16) * 2e-3 * 0.25 + 5e-4
    assert lat.layer_s(0, 2, 4, 16, 1, "int4") == pytest.approx(want)


def strip_formats(prof: dict) -> dict:
    """A profile as written before formats were profiled."""
    old = json.loads(json.dumps(prof))
    old["runs"] = {k: r for k, r in old["runs"].items() if r["role"] != "precision" and "expert_dtype" not in r}
    del old["model"]["format_expert_bytes"]
    old["grid"].pop("formats", None)
    old["timing"].pop("format_decode_delta_s", None)
    old["meta"]["settings"].pop("formats", None)
    return old


def test_a_profile_made_before_formats_plans_as_before(tiny_profile, tiny_ckpt, tmp_path, capsys):
    path, prof = tiny_profile
    old = strip_formats(prof)
    pm = fit(old)
    assert pm.format_bytes == {} and pm.formats == [None]
    planned = make_plan(old, "50%")
    assert planned.plan.expert_dtype is None  # the profile's single format: the model's own
    assert "expert_dtype" not in json.loads(planned.plan.to_json())
    # the same profile with formats: a format per layer, and never a worse prediction
    new = make_plan(prof, "50%")
    assert isinstance(new.plan.expert_dtype, list)
    assert new.result.objective <= planned.result.objective
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(old))
    out = tmp_path / "plan.json"
    assert main(["plan", str(tiny_ckpt), "-m", "50%", "--profile", str(old_path), "--out", str(out)]) == 0
    assert "precision" not in capsys.readouterr().err
    assert main(["plan", str(tiny_ckpt), "-m", "50%", "--profile", str(old_path), "--out", str(out),
                 "--formats", "int4"]) == 2
    assert "profile it with `swapmoe profile --formats" in capsys.readouterr().err


def test_plan_prints_the_precision_per_layer(tiny_profile, tiny_ckpt, tmp_path, capsys):
    path, _ = tiny_profile
    out = tmp_path / "plan.json"
    assert main(["plan", str(tiny_ckpt), "-m", "12%", "--profile", str(path), "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    written = json.loads(out.read_text())
    line = next(x for x in captured.err.splitlines() if "precision" in x)
    assert ",".join(str(f) for f in written["expert_dtype"]) in line and "per MoE layer" in line
    # 12% of the float32 experts cannot hold top-2 of both layers in float32 (25% needed): quantised
    assert all(f in FORMATS for f in written["expert_dtype"])


def test_sweep_runs_the_planned_policy_at_each_budget(tiny_profile, tiny_ckpt, calibration, tmp_path, capsys):
    path, prof = tiny_profile
    out = tmp_path / "sweep"
    args = ["sweep", str(tiny_ckpt), "--text", str(calibration), "--max-tokens", "33", "--window", "16",
            "--decode-tokens", "2", "--budgets", "12%,50%", "--policies", "planned", "--out", str(out),
            "--device", "cpu", "--no-warmup"]
    assert main(args) == 2  # no profile
    assert "needs a profile" in capsys.readouterr().err
    assert main([*args, "--profile", str(path)]) == 0
    data = json.loads((out / "sweep.json").read_text())
    assert data["meta"]["profile"] == str(path.resolve())
    for budget, frac in (("12%", 0.12), ("50%", 0.5)):
        cell = data["cells"][f"planned@{budget}"]
        plan = cell["plan"]
        assert plan["meta"]["budget_bytes"] == int(frac * prof["model"]["share_of_bytes"])
        # the run held what the plan predicted, within the budget
        assert cell["expert_bytes"] == plan["meta"]["predicted"]["expert_bytes"] <= plan["meta"]["budget_bytes"]
        assert len(plan["expert_dtype"]) == len(plan["slots"]) == 2
