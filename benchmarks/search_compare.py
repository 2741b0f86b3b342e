"""The planner's search methods on one profile: exact dynamic programming against the genetic algorithm.

For each memory budget, with and without a latency budget, runs ``search_dp`` once and ``search_ga``
over several seeds on the performance model fitted to a committed profile, and reports the objective
(predicted KL) each finds, the GA's worst gap to dp, and the seconds each took. Pure host work over a
JSON file: seconds on any CPU.

    python benchmarks/search_compare.py --profile docs/planner/cpu/profile-cpu.json \
        --out docs/planner/cpu/search-compare.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from swapmoe.budget import parse_budget
from swapmoe.planner.perfmodel import fit
from swapmoe.planner.profile import read_profile
from swapmoe.planner.search import SearchSpace, parse_latency, search_dp, search_ga
from swapmoe.provenance import provenance


def compare(profile_path: Path, budgets: list[str], latency: str, seeds: int) -> dict[str, Any]:
    data = read_profile(profile_path)
    pm = fit(data)
    space = SearchSpace(intervals=tuple(data["grid"]["intervals"]), strategies=tuple(pm.strategies),
                        static_interval=data["grid"]["reference_interval"])
    rows = []
    for budget in budgets:
        budget_bytes = parse_budget(budget).resolve(pm.total_bytes)
        for lat in (None, parse_latency(latency)):
            dp = search_dp(pm, budget_bytes, lat, space, "kl")
            ga = [search_ga(pm, budget_bytes, lat, space, "kl", seed=s) for s in range(seeds)]
            worst = max(r.objective for r in ga)
            rows.append({
                "budget": budget, "budget_bytes": budget_bytes, "latency_budget_s": lat,
                "dp_kl": dp.objective, "dp_seconds": dp.seconds, "dp_config": list(dp.config.slots),
                "ga_kl": [r.objective for r in ga], "ga_seconds": [r.seconds for r in ga],
                "ga_worst_gap": worst / dp.objective - 1.0 if dp.objective else 0.0,
            })
    return {"provenance": provenance("cpu"), "profile": str(profile_path), "seeds": seeds, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    head = "| budget | latency budget | dp KL | dp s | GA KL (best / worst of {n} seeds) | GA worst gap | GA s (median) |"
    lines = [head.format(n=result["seeds"]), "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lat = "-" if r["latency_budget_s"] is None else f"{1e3 * r['latency_budget_s']:.1f} ms"
        ga_s = sorted(r["ga_seconds"])[len(r["ga_seconds"]) // 2]
        lines.append(f"| {r['budget']} | {lat} | {r['dp_kl']:.4f} | {r['dp_seconds']:.2f} | "
                     f"{min(r['ga_kl']):.4f} / {max(r['ga_kl']):.4f} | {100 * r['ga_worst_gap']:+.2f}% | {ga_s:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", type=Path, default=Path("docs/planner/cpu/profile-cpu.json"))
    ap.add_argument("--budgets", default="25%,50%,75%")
    ap.add_argument("--latency-budget", default="17.2ms")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here (and the table beside it, .md)")
    args = ap.parse_args(argv)
    result = compare(args.profile, args.budgets.split(","), args.latency_budget, args.seeds)
    table = markdown(result)
    print(table, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
