"""The evaluation grid: figures per policy, resumable sweeps, the table and the plots."""

import json

import pytest
import torch

import swapmoe
from swapmoe.cli import main
from swapmoe.errors import SwapMoEError
from swapmoe.evaluation.compare import evaluate_stream
from swapmoe.evaluation.sweep import grid, run_sweep
from tests.counting import recount_hits
from tests.engine.tiny import build_checkpoint, build_tokenizer

VOCAB = len(build_tokenizer())
TEXT = "Once upon a time there was a king who had three daughters. The quick brown fox jumps. " * 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("sweep") / "tiny-moe")


def test_full_model_against_itself_agrees_exactly(ckpt):
    full = swapmoe.load(ckpt, "100%")
    ids = torch.randint(0, VOCAB, (120,), generator=torch.Generator().manual_seed(0)).tolist()
    r = evaluate_stream(full, ids, reference=swapmoe.load(ckpt, "100%"), window=32, decode_tokens=8)
    assert r.top1_agreement == 1.0 and abs(r.kl) < 1e-6
    assert r.tokens == 119 and r.decode_tokens == 8 and r.decode_s_per_token > 0


def test_masked_model_differs_and_stays_in_budget(ckpt):
    ids = torch.randint(0, VOCAB, (120,), generator=torch.Generator().manual_seed(0)).tolist()
    model = swapmoe.load(ckpt, "25%", update_interval=4)
    reference = swapmoe.load(ckpt, "100%")
    with recount_hits(model) as counted:
        r = evaluate_stream(model, ids, reference=reference, window=32, decode_tokens=0)
    assert r.kl > 0 and r.top1_agreement < 1
    assert r.expert_bytes <= model.swapmoe.budget_bytes
    assert counted["hits"] < counted["lookups"]  # a quarter of the experts resident: some choices missed
    assert r.hit_rate == counted["hits"] / counted["lookups"] and r.swaps > 0


def test_grid_runs_budget_free_policies_once():
    assert grid(["full", "swapmoe", "static"], ["25%", "50%"]) == [
        ("full", "100%"), ("swapmoe", "25%"), ("swapmoe", "50%"), ("static", "100%")]


def test_resume_skips_done_cells_and_refuses_another_setup(tmp_path):
    calls = []

    def cell(policy, budget):
        calls.append((policy, budget))
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted after one finished cell
        return {"perplexity": 1.0, "expert_bytes": 1}

    meta = {"model": "m", "text": "t", "stream": "s", "window": 8, "tokens": 10, "decode_tokens": 0}
    cells = [("swapmoe", "25%"), ("swapmoe", "50%")]
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cells, tmp_path / "sweep.json", meta, cell)
    data = run_sweep(cells, tmp_path / "sweep.json", meta, lambda p, b: {"perplexity": 2.0, "expert_bytes": 2})
    assert calls == [("swapmoe", "25%"), ("swapmoe", "50%")]
    assert data["cells"]["swapmoe@25%"]["perplexity"] == 1.0  # kept, not redone
    assert data["cells"]["swapmoe@50%"]["perplexity"] == 2.0
    with pytest.raises(SwapMoEError, match="another set-up"):
        run_sweep(cells, tmp_path / "sweep.json", {**meta, "window": 16}, cell)


def test_sweep_command_writes_json_table_and_plots(ckpt, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "out"
    args = ["sweep", str(ckpt), "--text", str(text), "--budgets", "25%,50%", "--policies",
            "full,swapmoe,ondemand", "--window", "32", "--decode-tokens", "2", "--no-warmup", "--out", str(out)]
    assert main(args) == 0
    data = json.loads((out / "sweep.json").read_text())
    assert set(data["cells"]) == {"full", "swapmoe@25%", "swapmoe@50%", "ondemand@25%", "ondemand@50%"}
    full = data["cells"]["full"]
    assert full["kl"] == 0.0 and full["top1_agreement"] == 1.0  # measured against the reference model
    for key, row in data["cells"].items():
        assert row["provenance"]["transformers"] and row["provenance"]["device"].startswith("cpu")
        if key.startswith("ondemand"):  # exact: the full model's perplexity, at a fraction of the memory
            assert row["perplexity"] == pytest.approx(full["perplexity"], rel=1e-5)
            assert row["expert_bytes"] < full["expert_bytes"]
    assert (out / "sweep.md").read_text().count("\n") == 2 + 5
    assert (out / "perplexity_vs_memory.png").stat().st_size > 1000
    assert (out / "latency_vs_memory.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(args) == 0  # everything done: resumes without running a cell
    assert capsys.readouterr().err.count("done already") == 5


def test_sweep_rejects_bad_policies_and_budgets(ckpt, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    base = ["sweep", str(ckpt), "--text", str(text), "--out", str(tmp_path / "o")]
    assert main([*base, "--policies", "swapmoe,lru"]) == 2
    assert main([*base, "--budgets", "25%,lots"]) == 2
    assert main(["eval", str(ckpt), "--text", str(tmp_path / "missing.txt")]) == 2
