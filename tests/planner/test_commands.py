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

ROLES = {"full", "layer", "uniform", "static", "interval", "precision", "holdout"}
#: bytes of one expert of the tiny model (gate_up [2I, H] + down [H, I], I=16, H=32) in each format: bf16 is a
#: cast of the float32 weights; int8 adds a float16 scale per row (32 and 16 do not hold a group of 64); int4
#: packs two codes a byte and adds a float16 scale and zero point per row
FORMAT_BYTES = {"bf16": 3 * 16 * 32 * 2, "int8": 3 * 16 * 32 + 2 * (32 + 32),
                "int4": 3 * 16 * 32 // 2 + 2 * 2 * (32 + 32), "int3": 3 * 16 * 32 * 3 // 8 + 2 * 2 * (32 + 32),
                "int2": 3 * 16 * 32 // 4 + 2 * 2 * (32 + 32)}


def run_bytes(run: dict, model: dict) -> int:
    """A configuration's expert bytes by arithmetic, each layer in its format (None: the base)."""
    fmts = run.get("expert_dtype") or [None] * len(run["slots"])
    return sum(s * (b if f is None else model["format_expert_bytes"][f][i])
               for i, (s, b, f) in enumerate(zip(run["slots"], model["expert_bytes"], fmts, strict=True)))


def plan_bytes(plan, model: dict) -> int:
    """A plan's expert bytes: its formats name the base (float32 here) None."""
    fmts = plan.expert_dtype if isinstance(plan.expert_dtype, list) else [plan.expert_dtype] * len(plan.slots)
    return sum(s * (b if f is None else model["format_expert_bytes"][f][i])
               for i, (s, b, f) in enumerate(zip(plan.slots, model["expert_bytes"], fmts, strict=True)))


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
    # each layer alone in each format, all its experts resident, the others full in the base (float32)
    assert m["format_expert_bytes"] == {f: [b, b] for f, b in FORMAT_BYTES.items()}
    precision = sorted((r["expert_dtype"].index(next(f for f in r["expert_dtype"] if f)),
                        next(f for f in r["expert_dtype"] if f)) for r in runs if r["role"] == "precision")
    assert precision == sorted((i, f) for i in range(2) for f in FORMAT_BYTES)
    assert all(r["slots"] == [8, 8] and r["decode_s_per_token"] > 0 for r in runs if r["role"] == "precision")
    # int4 rounds a layer coarser than int8, and int8 coarser than a cast to bf16 (KL against the float32 model)
    for i in range(2):
        kl = {f: r["kl"] for r in runs if r["role"] == "precision" for f in [r["expert_dtype"][i]] if f}
        assert 0 < kl["bf16"] < kl["int8"] < kl["int4"] < kl["int3"] < kl["int2"], kl
    assert set(t["format_decode_delta_s"]) == set(FORMAT_BYTES)
    for r in runs:
        # measured (the runtime's resident bytes) against arithmetic in each layer's format
        assert r["expert_bytes"] == run_bytes(r, m), r
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
    assert isinstance(plan.expert_dtype, list) and len(plan.expert_dtype) == 2  # a precision per MoE layer
    assert plan_bytes(plan, prof["model"]) == plan.meta["predicted"]["expert_bytes"] <= budget
    assert plan.update_interval >= 1 and plan.strategy in ("exchange", "skip")
    assert "planned" in capsys.readouterr().err


def test_planned_run_never_holds_more_expert_bytes_than_the_budget(tiny_profile, tiny_ckpt, tmp_path):
    path, prof = tiny_profile
    # 10%: even int4 cannot hold every expert (experts swap); 25% and 60%: the planner's precisions
    budgets = {"10%": None, "25%": None, "60%": None}
    for b in budgets:
        out = tmp_path / f"plan-{b}.json"
        assert main(["plan", str(tiny_ckpt), "-m", b, "--profile", str(path), "--out", str(out),
                     "--no-static"]) == 0
        budgets[b] = (out, read_plan(out))
    assert any(f is not None for _, p in budgets.values() for f in p.expert_dtype)  # some layer quantised
    for out, plan in budgets.values():
        # loaded through the plan (each layer in its format), updating every token, two swaps at a
        # time: as many copies as the runtime will make
        model = swapmoe.load(tiny_ckpt, plan=out, update_interval=1, swaps_per_update=2, device="cpu")
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
        if any(s < 8 for s in plan.slots):
            assert stats["swaps"] > 0  # experts did move
        assert max(peak) <= plan.meta["budget_bytes"]
        assert max(peak) == plan.meta["predicted"]["expert_bytes"] == stats["resident_bytes"]
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
    assert main([*base, "-m", "2%"]) == 2  # of the float32 experts' 98,304 bytes: below 2,560
    err = capsys.readouterr().err
    least = 2 * 2 * min(FORMAT_BYTES.values())  # top-2 of both layers, in the most compact format profiled
    assert f"--memory-budget {least} or more" in err and "Traceback" not in err
    assert main([*base, "-m", "10%", "--formats", "float32,bf16"]) == 2  # not a format
    assert "--formats" in capsys.readouterr().err
    assert main([*base, "-m", "10%", "--formats", "bf16"]) == 2  # bf16 alone: top-2 in bf16 does not fit
    assert f"--memory-budget {2 * 2 * FORMAT_BYTES['bf16']} or more" in capsys.readouterr().err
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
    # --formats none: one format for the whole model, as before the planner chose precision per layer
    assert main(["profile", str(tiny_ckpt), "--calibration", str(calibration), "--out", str(out),
                 "--expert-dtype", "int8", "--formats", "none", *SMALL]) == 0
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
