"""A hit rate that was not measured is None (shown as "-"), never 1.0."""

import torch
from rich.console import Console

import swapmoe
from swapmoe.cli import format_rate, stats_table
from tests.tiny_models import make_checkpoint


def _table_text(stats) -> str:
    console = Console(width=200, record=True)
    console.print(stats_table(stats))
    return console.export_text()


def test_hit_rate_is_none_until_something_is_looked_up(tmp_path):
    model = swapmoe.load(make_checkpoint("mixtral", tmp_path / "m"), "50%", device="cpu")
    stats = model.swapmoe.stats()
    assert stats["total"]["hit_rate"] is None and stats["total"]["lookups"] == 0
    assert [la["hit_rate"] for la in stats["layers"]] == [None] * len(stats["layers"])
    rows = [ln.strip("│ ") for ln in _table_text(stats).splitlines() if "│" in ln and "layer" not in ln]
    assert len(rows) == len(stats["layers"]) + 1 and all(ln.endswith(" -") for ln in rows)
    with torch.no_grad():
        model(torch.tensor([[2, 3, 4, 5]]))
    stats = model.swapmoe.stats()
    total = stats["total"]
    assert total["lookups"] == 4 * 2 * len(stats["layers"])  # tokens x top-2 x MoE layers
    assert total["hit_rate"] == total["hits"] / total["lookups"]
    assert format_rate(total["hit_rate"]) in _table_text(stats)
    model.swapmoe.reset_stats()
    assert model.swapmoe.stats()["total"]["hit_rate"] is None


def test_format_rate():
    assert format_rate(None) == "-" and format_rate(0.5) == "0.500" and format_rate(1.0) == "1.000"
