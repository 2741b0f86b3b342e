"""The tables in the docs are the committed result files, row for row.

Each table a page quotes is regenerated here from the JSON the command wrote, with the same code
that wrote the page's table, and every regenerated row must appear in the page: a figure edited by
hand, or a result file replaced without the page, turns this red.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from swapmoe.evaluation.sweep import markdown_table
from tests.repo_scripts import load_script

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _rows(table: str) -> list[str]:
    return [ln.strip() for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| policy")
            and not ln.startswith("| budget |")]


def _benchmark(name: str):
    return load_script(f"benchmarks/{name}.py")


def _missing(rows: list[str], page: Path) -> list[str]:
    text = {ln.strip() for ln in page.read_text(encoding="utf-8").splitlines()}
    return [r for r in rows if r not in text]


def test_reference_sweep_table_is_its_sweep_json():
    data = json.loads((DOCS / "results" / "ref-sweep" / "sweep.json").read_text())
    rows = _rows(markdown_table(data))
    assert len(rows) == len(data["cells"])
    # the page labels the dense twin's row, and sums up the 100% rows of the budgeted policies in one
    # sentence ("every policy at 100% equals full: perplexity 66.779"); every other row is verbatim
    full = data["cells"]["full"]["perplexity"]
    at_full = [c for k, c in data["cells"].items() if c["budget"] == "100%" and c["policy"] not in ("full", "static")]
    assert at_full and all(f"{c['perplexity']:.3f}" == f"{full:.3f}" == "66.779" for c in at_full)
    page_rows = [r.replace("| static | 100% |", "| static (dense twin) | - |") for r in rows
                 if not (" | 100% | " in r and not r.startswith(("| full ", "| static ")))]
    assert _missing(page_rows, DOCS / "evaluation.md") == []


def test_gpu_budget_table_is_its_json():
    budgets = _benchmark("budgets")
    rows = json.loads((DOCS / "results" / "budgets-olmoe-1b-7b.json").read_text())
    assert _missing(_rows(budgets.markdown(rows)), DOCS / "benchmarks.md") == []


@pytest.mark.parametrize("page", ["planner.md"])
def test_search_comparison_table_is_its_json(page):
    search_compare = _benchmark("search_compare")
    result = json.loads((DOCS / "planner" / "cpu" / "search-compare.json").read_text())
    assert {"torch", "transformers", "device", "git_commit"} <= set(result["provenance"])
    assert _missing(_rows(search_compare.markdown(result)), DOCS / page) == []


def test_overhead_table_is_its_json():
    result = json.loads((DOCS / "results" / "overhead" / "overhead.json").read_text())
    base = result["ms_per_token"]["plain transformers"]
    rows = [f"| {name} | {ms:.2f} | {ms / base:.3f} | {statistics.median(result['all_rounds_ms'][name]):.2f} |"
            for name, ms in result["ms_per_token"].items()]
    assert _missing(rows, DOCS / "benchmarks.md") == []


def test_load_memory_table_is_its_json():
    result = json.loads((DOCS / "results" / "load-memory" / "load_memory.json").read_text())
    size = result["checkpoint_bytes"]
    page = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    for r in result["rows"]:
        figures = (f"| {r['setting']} | {r['peak_bytes'] / 2**20:.0f} | {r['after_bytes'] / 2**20:.0f} | "
                   f"{r['peak_bytes'] / size:.2f} |")
        assert figures in page, figures


@pytest.mark.parametrize("name", ["decode-olmoe-1b-7b", "decode-qwen3-30b-a3b-12l", "decode-olmoe-1b-7b-kernels",
                                  "decode-olmoe-1b-7b-compiled-fused", "decode-olmoe-1b-7b-fused",
                                  "decode-qwen3-30b-a3b-12l-fused", "decode-olmoe-1b-7b-quantised"])
def test_decode_tables_are_their_json(name):
    """The GPU decode tables of docs/benchmarks.md (and the figures README quotes from them)."""
    decode = _benchmark("decode")
    data = json.loads((DOCS / "results" / "decode" / f"{name}.json").read_text())
    assert data.get("complete", True) and data["device"] == "NVIDIA H200"  # older files predate "complete"
    assert _missing(_rows(decode.markdown(data["rows"])), DOCS / "benchmarks.md") == []


@pytest.mark.parametrize("name", ["fused_moe", "fused_moe-int4"])
def test_fused_kernel_tables_are_their_json(name):
    """The fused kernel's per-layer tables (bf16 and int8; int4 against the gather path)."""
    data = json.loads((DOCS / "results" / "fused_moe" / f"{name}.json").read_text())
    assert data["device"] == "NVIDIA H200"
    rows = [r for r in _rows(_benchmark("fused_moe").markdown(data)) if not r.startswith("| shape |")]
    assert len(rows) == len(data["rows"]) and _missing(rows, DOCS / "benchmarks.md") == []


def test_quantised_prefill_transient_table_is_its_json():
    """The chunked prefill's transient, GPU-busy time, kernels and load phase per format, as quoted."""
    before = {r["setting"]: r for r in json.loads(
        (DOCS / "results" / "decode" / "decode-olmoe-1b-7b-quantised.json").read_text())["rows"]}
    after = json.loads((DOCS / "results" / "decode" / "decode-olmoe-1b-7b-lowbit-profile.json").read_text())
    assert after["device"] == "NVIDIA H200"
    page = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    for r in after["rows"]:
        fmt = r["setting"].split()[1].rstrip(",")  # "swapmoe int8, slots of 50%, graph" -> int8
        old = before.get(r["setting"])
        was = f"{old['decode_transient_bytes'] / 1e6:,.1f} MB" if old else "-"
        row = (f"| {fmt} | {was} | {r['decode_transient_bytes'] / 1e6:,.1f} MB | {r['gpu_busy_ms']:.2f} | "
               f"{r['kernels']:.0f} | {r['load_phases_s']['experts']:.1f} s |")
        assert row in page, row
