"""Write the families tables of docs/families.md and README.md from the family walk's results.

    PYTHONPATH=src python scripts/families_table.py            # walk every MoE model type, rewrite both
    PYTHONPATH=src python scripts/families_table.py --check    # exit 1 if the committed tables differ

The walk (tests/family_walk.py, the same code as tests/test_family_walk.py) builds a tiny model of
every MoE model type the installed transformers registers and loads it through swapmoe. Its results
go to docs/results/families-walk.json and, as tables, between the ``<!-- walk:begin -->`` and
``<!-- walk:end -->`` markers of docs/families.md and ``<!-- families:begin/end -->`` of README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _how(r: dict, adapted: set[str]) -> str:
    if r["model_type"] in adapted:
        return "adapter"
    return "fused"


# Why a model type whose LM class exists is refused, as read in its transformers modeling code.
WHY = {
    "doge": "product-key retrieval experts (single-neuron experts picked by key search): no experts module beside a "
            "top-k router",
    "nllb-moe": "per-expert modules beside a top-2 router with capacity, like Switch: an adapter would be needed",
    "inkling_text": "its router returns a fourth value (shared-expert gammas): an adapter would be needed",
    "zaya": "its router carries state from layer to layer (a fourth value): an adapter would be needed",
}


def _reason(model_type: str, detail: str) -> str:
    if model_type in WHY:
        return WHY[model_type]
    if "is not a causal or seq2seq LM" in detail:
        return "no causal-LM (or seq2seq) class in transformers: a multimodal or encoder-only model"
    if "has no MoE layers" in detail:
        return "experts in a form swapmoe does not recognise (an adapter would be needed)"
    return detail.split(";")[0]


def doc_table(results: list[dict], version: str, adapted: set[str]) -> list[str]:
    """The table of docs/families.md: one row per model type, tested first."""
    order = {"tested": 0, "recognised": 1, "refused": 2}
    rows = [f"Walked on transformers {version}: {len(results)} MoE model types "
            f"({sum(r['status'] == 'tested' for r in results)} tested, "
            f"{sum(r['status'] == 'recognised' for r in results)} recognised, "
            f"{sum(r['status'] == 'refused' for r in results)} refused).", "",
            "| model type | status | path | exchange rule (refused: why) | at 100% |", "|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (order[r["status"]], r["model_type"])):
        if r["status"] == "refused":
            rows.append(f"| `{r['model_type']}` | refused | | {_reason(r['model_type'], r['detail'])} | |")
        else:
            rows.append(f"| `{r['model_type']}` | {r['status']} | {_how(r, adapted)} | `{r['detail']}` "
                        f"| {r['exact']} |")
    return rows


def readme_lines(results: list[dict], version: str) -> list[str]:
    """The README's lists: the model types of each status."""
    def names(status: str) -> str:
        return ", ".join(f"`{r['model_type']}`" for r in sorted(results, key=lambda r: r["model_type"])
                         if r["status"] == status)

    return [
        f"Every MoE model type transformers {version} registers is walked by `tests/test_family_walk.py` "
        "(a tiny random model of each, loaded through swapmoe); docs/families.md has the table.",
        "",
        f"- **tested** (exact at 100% and the whole family matrix: budget, only resident experts computed, "
        f"resident set follows the router, exchange and skip touch only tokens with a missing choice): "
        f"{names('tested')}",
        f"- **recognised** (equal to transformers at 100% and runs within a budget; exchange by the rule "
        f"of the family whose router it runs, else generic substitution): {names('recognised')}",
        f"- **refused** with a one-line error: {names('refused')}",
    ]


def replace_between(text: str, begin: str, end: str, lines: list[str]) -> str:
    head, sep, rest = text.partition(begin)
    if not sep or end not in rest:
        raise SystemExit(f"markers {begin} ... {end} not found")
    return head + begin + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1]


def run_walk() -> tuple[list[dict], str]:
    import torch
    from tests.family_walk import installed_transformers, moe_model_types, walk

    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for mt in moe_model_types():
            results.append(walk(mt, Path(tmp)).as_dict())
            print(f"{mt:28s} {results[-1]['status']}", file=sys.stderr, flush=True)
    return results, installed_transformers()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    ap.add_argument("--from-json", action="store_true", help="reuse docs/results/families-walk.json (no walk)")
    args = ap.parse_args()
    sys.path[:0] = [str(REPO), str(REPO / "src")]
    from swapmoe.adapters import ADAPTERS

    out = REPO / "docs" / "results" / "families-walk.json"
    if args.from_json:
        saved = json.loads(out.read_text())
        results, version = saved["results"], saved["transformers"]
    else:
        results, version = run_walk()
    files = {
        out: json.dumps({"transformers": version, "results": results}, indent=1) + "\n",
        REPO / "docs" / "families.md": replace_between((REPO / "docs" / "families.md").read_text(),
                                                      "<!-- walk:begin -->", "<!-- walk:end -->",
                                                      doc_table(results, version, set(ADAPTERS))),
        REPO / "README.md": replace_between((REPO / "README.md").read_text(), "<!-- families:begin -->",
                                            "<!-- families:end -->", readme_lines(results, version)),
    }
    if args.check:
        stale = [str(p.relative_to(REPO)) for p, text in files.items() if not p.is_file() or p.read_text() != text]
        if stale:
            print(f"out of date: {', '.join(stale)}; run scripts/families_table.py", file=sys.stderr)
            return 1
        return 0
    for p, text in files.items():
        p.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
