"""docs/quantization.md quotes the committed result files and `swapmoe info`, row for row."""

from __future__ import annotations

import json
from pathlib import Path

from swapmoe.evaluation.sweep import markdown_table
from tests.repo_scripts import load_script

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "quantization.md"
RESULTS = REPO / "docs" / "results" / "quant"


def _rows(table: str) -> list[str]:
    return [ln.strip() for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| policy")
            and not ln.startswith("| quantiser")]


def _missing(rows: list[str]) -> list[str]:
    text = {ln.strip() for ln in PAGE.read_text(encoding="utf-8").splitlines()}
    return [r for r in rows if r not in text]


def test_sweep_table_is_its_json():
    data = json.loads((RESULTS / "ref-sweep" / "sweep.json").read_text())
    rows = _rows(markdown_table(data))
    assert len(rows) == len(data["cells"]) and not _missing(rows)


def test_lowbit_sweep_table_is_its_json():
    data = json.loads((RESULTS / "lowbit-sweep" / "sweep.json").read_text())
    rows = _rows(markdown_table(data))
    assert len(rows) == len(data["cells"]) == 11 and not _missing(rows)


def test_lowbit_formats_table_is_its_json():
    module = load_script("benchmarks/lowbit_formats.py")
    record = json.loads((RESULTS / "lowbit-formats.json").read_text())
    rows = [r for r in _rows(module.markdown_table(record)) if not r.startswith("| format")]
    assert len(rows) == len(record["rows"]) and not _missing(rows)


def test_comparison_table_is_its_json():
    module = load_script("benchmarks/quant_compare.py")
    record = json.loads((RESULTS / "compare.json").read_text())
    rows = _rows(module.markdown_table(record))
    assert len(rows) == len(record["rows"]) and not _missing(rows)


def test_experts_per_budget_table_is_what_info_computes():
    from swapmoe.budget import format_bytes
    from swapmoe.inspect import describe
    from swapmoe.loader import default_model_path
    from swapmoe.quant import FORMATS

    info = describe(default_model_path())
    rows = []
    for frac, label in ((0.125, "12.5%"), (0.25, "25%"), (0.5, "50%"), (0.75, "75%")):
        cells = ["/".join(map(str, sorted(set(info.slots_for(frac, f))))) for f in (None, *FORMATS[1:])]
        rows.append(f"| {label} | {format_bytes(int(frac * info.total_expert_bytes))} | " + " | ".join(cells) + " |")
    assert not _missing(rows)


def test_mixed_precision_sweep_and_its_plans_are_its_json():
    """The sweep with the planner's mixed plans (policy planned): every cell, and every plan it ran."""
    from swapmoe.evaluation.sweep import plans_table

    data = json.loads((RESULTS / "mixed-sweep" / "sweep.json").read_text())
    rows = _rows(markdown_table(data))
    assert len(rows) == len(data["cells"]) and not _missing(rows)
    plans = [ln for ln in _rows(plans_table(data)) if not ln.startswith("| budget")]
    assert len(plans) == sum(1 for c in data["cells"].values() if c["policy"] == "planned") == 4
    assert not _missing(plans)
