"""The memory / latency / accuracy grid: every policy at every budget, resumable.

Results go to ``<out>/sweep.json`` after every cell (written atomically), so an interrupted sweep
resumes where it stopped; a results file made for another model, text or window is refused rather
than mixed in. ``full`` and ``static`` do not depend on the budget and are run once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from swapmoe.errors import SwapMoEError

BUDGET_FREE = ("full", "static")


def cell_key(policy: str, budget: str) -> str:
    return f"{policy}@{budget}" if policy not in BUDGET_FREE else policy


def grid(policies: Sequence[str], budgets: Sequence[str]) -> list[tuple[str, str]]:
    """The cells of a sweep in run order: budget-free policies once, the others at every budget."""
    cells: list[tuple[str, str]] = []
    for p in policies:
        if p in BUDGET_FREE:
            cells.append((p, "100%"))
        else:
            cells.extend((p, b) for b in budgets)
    return cells


def stream_fingerprint(token_ids: Sequence[int]) -> str:
    h = hashlib.sha256()
    h.update(",".join(map(str, token_ids)).encode())
    return h.hexdigest()[:16]


def load_results(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Cells already done for the same set-up; a different set-up in the same file is an error."""
    if not path.is_file():
        return {"meta": meta, "cells": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SwapMoEError(f"{path} is not valid JSON ({e}): delete it or choose another --out") from None
    old = data.get("meta", {})
    differs = [k for k in ("model", "text", "stream", "window", "tokens", "decode_tokens", "expert_dtype")
               if old.get(k) != meta.get(k)]
    if differs:
        raise SwapMoEError(
            f"{path} holds a sweep of another set-up (differs in {', '.join(differs)}): "
            "choose another --out, or delete the file to start again"
        )
    data.setdefault("cells", {})
    return data


def save_results(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_sweep(
    cells: Sequence[tuple[str, str]],
    results_path: Path,
    meta: dict[str, Any],
    run_cell: Callable[[str, str], dict[str, Any]],
    on_skip: Callable[[str], None] | None = None,
    on_error: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Run the cells not yet in ``results_path``, saving after each one; returns all results."""
    data = load_results(results_path, meta)
    for policy, budget in cells:
        key = cell_key(policy, budget)
        if key in data["cells"]:
            if on_skip is not None:
                on_skip(key)
            continue
        try:
            row = run_cell(policy, budget)
        except (SwapMoEError, RuntimeError, ValueError, OSError) as e:
            # one policy failing (e.g. no GPU for accelerate-offload) must not cost the other cells;
            # the failure is reported and not saved, so a resumed sweep tries the cell again
            data.setdefault("failed", {})[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            if on_error is not None:
                on_error(key, data["failed"][key])
            continue
        data.get("failed", {}).pop(key, None)
        data["cells"][key] = {"policy": policy, "budget": budget if policy not in BUDGET_FREE else "100%", **row}
        save_results(results_path, data)
    return data


def markdown_table(data: dict[str, Any]) -> str:
    """One row per cell: the figures the trade-off is argued from."""
    head = ["policy", "budget", "expert MiB", "other MiB", "peak MiB", "perplexity", "top-1 agree", "KL (nats)",
            "prefill ms/tok", "decode ms/tok", "hit rate", "swaps", "MiB copied"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in sorted(data["cells"].values(), key=lambda r: (r["policy"], r["expert_bytes"])):
        lines.append("| " + " | ".join([
            r["policy"], r["budget"], f(r["expert_bytes"] / 2**20, ".2f"), f(r["other_bytes"] / 2**20, ".2f"),
            f(r["peak_bytes"] / 2**20 if r.get("peak_bytes") else None, ".1f"), f(r["perplexity"], ".3f"),
            f(r.get("top1_agreement"), ".4f"), f(r.get("kl"), ".3g"), f(r["prefill_s_per_token"] * 1e3, ".3f"),
            f(r["decode_s_per_token"] * 1e3 if r.get("decode_s_per_token") else None, ".2f"),
            f(r.get("hit_rate"), ".3f"), f(r.get("swaps"), "d"),
            f(r["bytes_copied"] / 2**20 if r.get("bytes_copied") is not None else None, ".1f"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def plans_table(data: dict[str, Any]) -> str:
    """One row per cell that ran a plan (policy ``planned``): what the planner chose at that budget,
    and what it predicted against what the cell measured. Empty when no cell did."""
    rows = sorted((r for r in data["cells"].values() if r.get("plan")), key=lambda r: r["expert_bytes"])
    if not rows:
        return ""
    head = ["budget", "slots per layer", "format per layer", "schedule", "expert MiB pred / meas",
            "perplexity", "KL pred (calibration) / meas"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p = r["plan"]
        fmts = p.get("expert_dtype")
        fmts = ",".join(str(f) for f in fmts) if isinstance(fmts, list) else str(fmts)
        sched = ("static" if p["swaps_per_update"] == 0 else
                 f"every {p['update_interval']}, {p['swaps_per_update']} swap") + f", {p['strategy']}"
        pred = p["meta"]["predicted"]
        lines.append("| " + " | ".join([
            r["budget"], ",".join(map(str, p["slots"])), fmts, sched,
            f"{pred['expert_bytes'] / 2**20:.2f} / {r['expert_bytes'] / 2**20:.2f}", f"{r['perplexity']:.3f}",
            f"{pred['kl']:.3g} / " + ("-" if r.get("kl") is None else f"{r['kl']:.3g}"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """Perplexity and decode latency against expert memory, one line per policy (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_policy: dict[str, list[dict[str, Any]]] = {}
    for r in data["cells"].values():
        by_policy.setdefault(r["policy"], []).append(r)
    paths = []
    for metric, label, fname, scale in (
        ("perplexity", "perplexity (lower is better)", "perplexity_vs_memory.png", 1.0),
        ("decode_s_per_token", "decode latency, ms per token", "latency_vs_memory.png", 1e3),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        for policy, rows in sorted(by_policy.items()):
            rows = [r for r in rows if r.get(metric) is not None]
            if not rows:
                continue
            rows.sort(key=lambda r: r["expert_bytes"])
            xs = [r["expert_bytes"] / 2**20 for r in rows]
            ys = [r[metric] * scale for r in rows]
            style = "--" if policy in BUDGET_FREE else "-"
            ax.plot(xs, ys, style, marker="o", label=policy)
        if metric == "perplexity":
            ax.set_yscale("log")  # budgets near the minimum cost orders of magnitude
        ax.set_xlabel("expert weights on the device (MiB)")
        ax.set_ylabel(label)
        ax.set_title(f"{data['meta'].get('model_name', '')}: {label.split(',')[0]} vs memory")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
