"""Every MoE model type the installed transformers registers: supported and exact, or refused in one line.

A tiny random model of each (tests/family_walk.py) is saved and loaded through swapmoe. A supported
family equals plain transformers at a 100% budget and runs a forward pass within a 50% budget; a
refused one stops with swapmoe's one-line error. A model type missing from ``EXPECTED`` fails here,
naming itself: that is how a family a new transformers release adds is noticed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from swapmoe.families import FAMILY_RULES, supported_families
from tests.family_walk import expected, installed_transformers, moe_model_types, walk
from tests.threads import single_torch_thread

WALKED = moe_model_types()
REPO = Path(__file__).resolve().parents[1]
RECORDED = REPO / "docs" / "results" / "families-walk.json"  # what docs/families.md and README were written from
# adapters that compute each expert on its own tokens instead of one batched product (see
# swapmoe/adapters/llama4.py): equal to float rounding at 100%, not bit for bit
ROUNDING = frozenset({"llama4", "llama4_text"})


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_torch_thread():
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("walk")


@pytest.mark.parametrize("model_type", WALKED)
def test_every_moe_family_is_supported_exactly_or_refused_in_one_line(model_type, root):
    if expected(model_type) is None:
        pytest.fail(f"transformers {installed_transformers()} has a MoE model type swapmoe has not walked: "
                    f"{model_type!r}. Run `python -m tests.family_walk {model_type}`, add it to EXPECTED in "
                    "tests/family_walk.py, and regenerate the docs (scripts/families_table.py)")
    result = walk(model_type, root)
    assert result.status == expected(model_type), result
    recorded = json.loads(RECORDED.read_text())
    if recorded["transformers"] == installed_transformers():  # the docs say what the walk finds
        assert {r["model_type"]: r for r in recorded["results"]}.get(model_type) == result.as_dict(), (
            "docs/families.md is out of date: run scripts/families_table.py")
    if result.status == "refused":
        assert len(result.detail.splitlines()) == 1 and repr(model_type) in result.detail
    else:
        assert result.moe_layers > 0
        assert result.exact == ("float rounding" if model_type in ROUNDING else "bit-identical")


def test_the_walk_covers_every_tested_family():
    """The tested families are walked too, and "tested" means exactly: a routing rule or an adapter."""
    installed = set(WALKED)
    tested = {f for f in supported_families() if f in installed}
    assert tested == {f for f in installed if expected(f) == "tested"}
    assert tested >= {"mixtral", "qwen3_moe", "switch_transformers"}


@pytest.mark.skipif("sarvam_moe" not in WALKED, reason="this transformers has no sarvam_moe")
def test_a_family_built_from_another_familys_modules_routes_by_their_rule(root):
    """sarvam_moe is built from Glm4Moe modules: its router follows GLM4-MoE's rule, not the fallback."""
    assert walk("sarvam_moe", root).detail == FAMILY_RULES["glm4_moe"]


def test_the_committed_tables_are_the_recorded_walk():
    """docs/families.md and README.md hold the tables scripts/families_table.py writes from the record."""
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "families_table.py"), "--check", "--from-json"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
