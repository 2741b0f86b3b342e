"""`swapmoe profile` and `swapmoe plan` end to end on a tiny checkpoint, and the memory guarantee of a
planned run."""

from __future__ import annotations

import json
import shutil

import torch

import swapmoe
from swapmoe.cli import main
from swapmoe.plan import read_plan
from swapmoe.planner import load_with_plan
from swapmoe.planner.profile import read_profile
from tests.memory import bookkeeping_allowance, experts_storages, held_storages
from tests.planner.conftest import SMALL


def expert_tensor_bytes(model) -> int:
    """The expert tensors the kernels read (slot tensors, or a full layer's), summed."""
    total = 0
    for st in model.swapmoe.layers:
        for n in st.layer.expert_param_names:
            t = getattr(st.layer.experts, n)
            total += t.numel() * t.element_size()
    return total


ROLES = {"full", "layer", "uniform", "static", "interval", "holdout"}


def test_profile_measures_memory_timing_and_accuracy(tiny_profile):
    _, prof = tiny_profile
    m, t = prof["model"], prof["timing"]
    assert m["num_experts"] == [8, 8] and m["top_k"] == [2, 2]
    assert m["expert_bytes"] == [3 * 16 * 32 * 4] * 2  # gate_up [2I, H] + down [H, I], I=16, H=32, float32
    assert m["total_expert_bytes"] == 2 * 8 * m["expert_bytes"][0]
    for key in ("expert_compute_s", "layer_decode_s", "layer_prefill_s_per_token", "transfer_s", "update_s",
                "update_submit_s", "policy_s"):
        assert len(t[key]) == 2 and all(v > 0 for v in t[key]), key
    runs = prof["runs"].values()
    assert {r["role"] for r in runs} == ROLES
    assert {r["strategy"] for r in runs if r["role"] in ("layer", "uniform")} == {"exchange", "skip"}
    for r in runs:
        assert r["expert_bytes"] == sum(s * b for s, b in zip(r["slots"], m["expert_bytes"], strict=True))
        assert r["tokens"] == 63 and r["kl"] >= 0 and 0 < r["top1"] <= 1
    full = next(r for r in runs if r["role"] == "full")
    # measured, not written down (profile.py once wrote kl=0.0 for this row): the 100% model scored against
    # the reference log-probabilities it produced itself; a forward that drifted between the two would show
    assert full["kl"] == 0.0 and full["top1"] == 1.0 and full["hit_rate"] == 1.0
    assert any(r["kl"] > 0 for r in runs if r["role"] == "uniform")


def test_profile_resumes_and_refuses_another_setup(tiny_profile, tiny_ckpt, calibration, tmp_path, capsys):
    path, prof = tiny_profile
    out = tmp_path / "profile.json"
    shutil.copy(path, out)
    data = json.loads(out.read_text())
    dropped = [k for k in data["runs"] if k.startswith("layer:")][:2]
    for k in dropped:
        del data["runs"][k]
    out.write_text(json.dumps(data))
    args = ["profile", str(tiny_ckpt), "--calibration", str(calibration), "--out", str(out), *SMALL]
    assert main(args) == 0
    again = read_profile(out)
    assert set(again["runs"]) == set(prof["runs"])
    for k, r in prof["runs"].items():
        if k not in dropped:
            assert again["runs"][k] == r  # done ones were skipped, not measured again
    assert main([*args[:-len(SMALL)], *SMALL, "--window", "8"]) == 2
    assert "another set-up" in capsys.readouterr().err


def test_plan_writes_a_plan_within_the_budget(tiny_profile, tiny_ckpt, tmp_path, capsys):
    path, prof = tiny_profile
    out = tmp_path / "plan.json"
    assert main(["plan", str(tiny_ckpt), "--memory-budget", "50%", "--profile", str(path), "--out", str(out)]) == 0
    plan = read_plan(out)
    budget = prof["model"]["total_expert_bytes"] // 2
    assert plan.meta["budget_bytes"] == budget
    used = sum(s * b for s, b in zip(plan.slots, prof["model"]["expert_bytes"], strict=True))
    assert used == plan.meta["predicted"]["expert_bytes"] <= budget
    assert plan.update_interval >= 1 and plan.strategy in ("exchange", "skip")
    assert "planned" in capsys.readouterr().err


def test_planned_run_never_holds_more_expert_bytes_than_the_budget(tiny_profile, tiny_ckpt, tmp_path):
    path, prof = tiny_profile
    budgets = {"25%": None, "60%": None}
    for b in budgets:
        out = tmp_path / f"plan-{b}.json"
        assert main(["plan", str(tiny_ckpt), "-m", b, "--profile", str(path), "--out", str(out),
                     "--no-static"]) == 0
        budgets[b] = read_plan(out)
    for plan in budgets.values():
        # update every token, two swaps at a time: as many copies as the runtime will make
        model = swapmoe.load(tiny_ckpt, slots=plan.slots, update_interval=1, swaps_per_update=2,
                             strategy=plan.strategy, device="cpu")
        # measured from the storages the experts modules and the runtime hold (tests/memory.py), not
        # from the slot tensors' declared size
        peak: list[int] = []
        held: list[int] = []

        def measure(*_, m=model, peak=peak, held=held):
            peak.append(experts_storages(m).bytes)
            held.append(held_storages(m).bytes)

        handle = model.register_forward_hook(measure)
        ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
        handle.remove()
        stats = model.swapmoe.stats()["total"]
        assert stats["swaps"] > 0  # experts did move
        assert max(peak) <= plan.meta["budget_bytes"]
        assert max(peak) == plan.meta["predicted"]["expert_bytes"] == expert_tensor_bytes(model)
        assert max(held) <= plan.meta["budget_bytes"] + bookkeeping_allowance(model)


def test_generate_and_eval_take_the_plan(tiny_profile, tiny_ckpt, calibration, tmp_path, capsys):
    path, _ = tiny_profile
    out = tmp_path / "plan.json"
    assert main(["plan", str(tiny_ckpt), "-m", "40%", "--profile", str(path), "--out", str(out)]) == 0
    assert main(["generate", str(tiny_ckpt), "--plan", str(out), "--prompt", "The quick", "-n", "4",
                 "--device", "cpu"]) == 0
    plan = read_plan(out)
    model = load_with_plan(tiny_ckpt, out, device="cpu")  # the Python API
    assert [la["slots"] for la in model.swapmoe.stats()["layers"]] == plan.slots
    assert model.swapmoe.config.strategy == plan.strategy
    assert model.swapmoe.config.update_interval == plan.update_interval
    assert main(["eval", str(tiny_ckpt), "--plan", str(out), "--text", str(calibration), "--max-tokens", "40",
                 "--window", "16", "--decode-tokens", "2", "--device", "cpu", "--no-reference"]) == 0


def test_impossible_budgets_are_one_line_errors(tiny_profile, tiny_ckpt, tmp_path, capsys):
    path, prof = tiny_profile
    out = tmp_path / "plan.json"
    base = ["plan", str(tiny_ckpt), "--profile", str(path), "--out", str(out)]
    assert main([*base, "-m", "10%"]) == 2
    err = capsys.readouterr().err
    assert f"--memory-budget {prof['model']['minimum_bytes']} or more" in err and "Traceback" not in err
    assert main([*base, "-m", "25%", "--latency-budget", "1us"]) == 2
    err = capsys.readouterr().err
    assert "--latency-budget" in err and "no memory budget reaches it" in err
    assert main([*base, "-m", "25%", "--latency-budget", "fast"]) == 2
    assert "invalid latency budget" in capsys.readouterr().err
    assert main(["plan", str(tiny_ckpt), "-m", "50%", "--profile", str(tmp_path / "none.json")]) == 2
    assert "swapmoe profile" in capsys.readouterr().err
    assert not out.exists()


def test_plan_compare_runs_both_methods(tiny_profile, tiny_ckpt, tmp_path, capsys):
    path, _ = tiny_profile
    out = tmp_path / "plan.json"
    assert main(["plan", str(tiny_ckpt), "-m", "50%", "--profile", str(path), "--out", str(out),
                 "--method", "compare"]) == 0
    err = capsys.readouterr().err
    assert "dp" in err and "ga" in err and "exhaustive" in err
    assert read_plan(out).meta["method"] == "dp"


def test_a_profile_of_another_model_is_refused(tiny_profile, tiny_ckpt, tmp_path, capsys):
    path, _ = tiny_profile
    data = json.loads(path.read_text())
    data["model"]["num_experts"] = [16, 16]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    assert main(["plan", str(tiny_ckpt), "-m", "50%", "--profile", str(other), "--out", str(tmp_path / "p.json")]) == 2
    assert "another model" in capsys.readouterr().err


def test_profile_and_plan_in_an_expert_dtype(tiny_ckpt, calibration, tmp_path):
    """`profile --expert-dtype int8` measures the model held in int8; `plan` writes int8 into the plan,
    and the planned run holds int8 experts within the budget."""
    from swapmoe.quant import ExpertLayout

    out = tmp_path / "profile.json"
    assert main(["profile", str(tiny_ckpt), "--calibration", str(calibration), "--out", str(out),
                 "--expert-dtype", "int8", *SMALL]) == 0
    prof = read_profile(out)
    assert prof["meta"]["expert_dtype"] == "int8"
    plan_path = tmp_path / "plan.json"
    assert main(["plan", str(tiny_ckpt), "--memory-budget", "50%", "--profile", str(out), "--out", str(plan_path)]) == 0
    plan = read_plan(plan_path)
    assert plan.expert_dtype == "int8"
    # a share is of the experts as the model holds them (float32 here), as `-m 50% --expert-dtype int8` counts it
    assert plan.meta["budget_bytes"] == prof["model"]["share_of_bytes"] // 2 > prof["model"]["total_expert_bytes"] // 2
    model = load_with_plan(tiny_ckpt, plan_path)
    for st, b in zip(model.swapmoe.layers, prof["model"]["expert_bytes"], strict=True):
        layout = st.layer.experts.forward.layout
        assert isinstance(layout, ExpertLayout) and layout.fmt == "int8" and layout.expert_bytes() == b
    stats = model.swapmoe.stats()["total"]
    assert experts_storages(model).bytes == stats["resident_bytes"] <= plan.meta["budget_bytes"]
