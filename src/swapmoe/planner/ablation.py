"""The planner against its ablations, measured: ``python -m swapmoe.planner.ablation``.

For each budget (25%, 50%, 75% by default) four configurations with the same expert memory are
read over the same held-out stream (batch 1, in windows, in order; KL against the full model):

=================  ========================================================================
planned            ``swapmoe plan``'s choice (slots per layer, interval, swaps, strategy)
uniform            the loader's uniform allocation with the default schedule (the paper's
                   "simple planning" ablation)
uniform+schedule   uniform allocation with the planned schedule and strategy (isolates the
                   slot allocation)
count              the planned configuration with importance = tokens routed (the paper's
                   "simple scheduling" ablation)
=================  ========================================================================

It writes ``ablation.json`` (resumable), ``ablation.md`` (perplexity table; predicted against
measured memory, latency and accuracy) and ``ablation.png``. ``--split DIR`` first cuts the
held-out text of every domain into a calibration part and an evaluation part (disjoint).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from pathlib import Path
from typing import Any

VARIANTS = ("planned", "uniform", "uniform+schedule", "count")
DOMAINS = ("encyclopedia", "drama", "fairy_tale", "detective", "history", "medicine")


def split_heldout(heldout: Path, out: Path, calibration_chars: int = 1150, eval_chars: int = 2300) -> tuple[Path, Path]:
    """Per domain, the first lines of the first half of its held-out file evaluate and the first lines
    of its second half calibrate (disjoint); each part visits the domains in turn, a drifting stream
    of about ``chars`` characters per domain. Deterministic."""
    calib, evals = [], []

    def take(lines: list[str], chars: int) -> str:
        got, n = [], 0
        for line in lines:
            if n >= chars:
                break
            got.append(line)
            n += len(line) + 1
        return "\n".join(got).strip()

    for d in DOMAINS:
        f = heldout / f"{d}.txt"
        if not f.is_file():
            continue
        lines = f.read_text(encoding="utf-8").splitlines()
        half = len(lines) // 2
        evals.append(take(lines[:half], eval_chars))
        calib.append(take(lines[half:], calibration_chars))
    if not calib:
        raise SystemExit(f"no held-out domain files ({', '.join(DOMAINS)}) in {heldout}")
    out.mkdir(parents=True, exist_ok=True)
    c, e = out / "calibration.txt", out / "eval.txt"
    c.write_text("\n\n".join(calib) + "\n", encoding="utf-8")
    e.write_text("\n\n".join(evals) + "\n", encoding="utf-8")
    return c, e


def _load(model_path: str, variant: str, plan: Any, budget: str, kw: dict[str, Any]) -> Any:
    import swapmoe

    if variant == "planned":
        return swapmoe.load(model_path, slots=plan.slots, update_interval=plan.update_interval,
                            swaps_per_update=plan.swaps_per_update, strategy=plan.strategy, **kw)
    if variant == "uniform":
        return swapmoe.load(model_path, budget, **kw)
    if variant == "uniform+schedule":
        return swapmoe.load(model_path, budget, update_interval=plan.update_interval,
                            swaps_per_update=plan.swaps_per_update, strategy=plan.strategy, **kw)
    return swapmoe.load(model_path, slots=plan.slots, update_interval=plan.update_interval,
                        swaps_per_update=plan.swaps_per_update, strategy=plan.strategy, importance="count", **kw)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    import swapmoe
    from swapmoe.budget import parse_budget
    from swapmoe.evaluation.perplexity import tokenize_text
    from swapmoe.plan import Plan
    from swapmoe.planner.measure import decode_steps, reference_logprobs, score
    from swapmoe.planner.perfmodel import Config, fit
    from swapmoe.planner.profile import read_profile, save_profile
    from swapmoe.planner.search import search, uniform_config
    from swapmoe.provenance import provenance

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prof = read_profile(args.profile)
    pm = fit(prof)
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = torch.as_tensor(tokenize_text(tok, Path(args.text).read_text(encoding="utf-8"), args.max_tokens))
    kw = {"device": args.device, "dtype": args.dtype or (prof["meta"]["dtype"] if prof["meta"]["dtype"] != "auto"
                                                           else None)}
    results_path = out / "ablation.json"
    data: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    meta = {"model": str(Path(args.model).resolve()), "profile": str(Path(args.profile).resolve()),
            "text": str(Path(args.text).resolve()), "tokens": int(ids.numel()), "window": args.window,
            "device": prof["meta"]["device"], "dtype": kw["dtype"], "machine": prof["meta"].get("machine"),
            "provenance": provenance(args.device)}
    if data.get("meta", {}).get("tokens") not in (None, meta["tokens"]):
        raise SystemExit(f"{results_path} holds another set-up: delete it or choose another --out")
    data["meta"] = meta
    data.setdefault("cells", {})
    full = swapmoe.load(args.model, "100%", **kw)
    ref, nll_full = reference_logprobs(full, ids, args.window)
    if "full" not in data["cells"]:
        row = score(full, ids, args.window, ref)
        row.update(decode_steps(full, ids, args.decode_tokens), variant="full", budget="100%", provenance=provenance(args.device),
                   expert_bytes=full.swapmoe.stats()["total"]["resident_bytes"])
        data["cells"]["full"] = row
        save_profile(results_path, data)
    del full
    for budget in args.budgets.split(","):
        budget_bytes = parse_budget(budget).resolve(pm.total_bytes)
        result = search(pm, budget_bytes, None, "dp", metric="kl", tolerance=args.tolerance)
        cfg = result.config
        plan = Plan(list(cfg.slots), cfg.update_interval, cfg.swaps_per_update, cfg.strategy)
        uni = uniform_config(pm, budget_bytes)
        predicted = {"planned": cfg, "uniform": uni,
                     "uniform+schedule": Config(uni.slots, cfg.update_interval, cfg.swaps_per_update, cfg.strategy),
                     "count": None}
        for variant in VARIANTS:
            key = f"{variant}@{budget}"
            if key in data["cells"]:
                continue
            model = _load(args.model, variant, plan, budget, kw)
            row = score(model, ids, args.window, ref)
            row.update(decode_steps(model, ids, args.decode_tokens))
            st = model.swapmoe.stats()["total"]
            row.update(variant=variant, budget=budget, budget_bytes=budget_bytes, expert_bytes=st["resident_bytes"],
                       slots=[la["slots"] for la in model.swapmoe.stats()["layers"]],
                       update_interval=model.swapmoe.config.update_interval,
                       swaps_per_update=model.swapmoe.config.swaps_per_update, strategy=model.swapmoe.config.strategy,
                       importance=model.swapmoe.config.importance)
            pc = predicted[variant]
            if pc is not None:
                p = pm.predict(pc)
                row["predicted"] = {"expert_bytes": p.expert_bytes, "decode_s_per_token": p.decode_s_per_token,
                                    "kl": p.kl, "nll_delta": p.nll_delta,
                                    "perplexity": math.exp(nll_full + p.nll_delta)}
            assert row["expert_bytes"] <= budget_bytes, (key, row["expert_bytes"], budget_bytes)
            row["provenance"] = provenance(args.device)
            data["cells"][key] = row
            save_profile(results_path, data)
            print(f"{key}: perplexity {math.exp(row['nll']):.3f}, KL {row['kl']:.4f}, "
                  f"decode {1e3 * row['decode_s_per_token']:.2f} ms/token", file=sys.stderr)
            del model
            gc.collect()
    (out / "ablation.md").write_text(markdown(data), encoding="utf-8")
    plot(data, out / "ablation.png")
    return data


def markdown(data: dict[str, Any]) -> str:
    cells = data["cells"]
    full = cells["full"]
    budgets = sorted({c["budget"] for k, c in cells.items() if k != "full"}, key=lambda b: float(b.rstrip("%")))
    lines = [f"Perplexity on {data['meta']['tokens']} held-out tokens (full model: {math.exp(full['nll']):.3f}); "
             "KL(full || variant) in nats per token in brackets.", "",
             "| budget | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    for b in budgets:
        row = [b]
        for v in VARIANTS:
            c = cells.get(f"{v}@{b}")
            row.append("-" if c is None else f"{math.exp(c['nll']):.3f} ({c['kl']:.4f})")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Planned configurations:", "", "| budget | slots per layer | interval | swaps | strategy |",
              "|---|---|---|---|---|"]
    for b in budgets:
        c = cells.get(f"planned@{b}")
        if c is not None:
            lines.append(f"| {b} | {','.join(map(str, c['slots']))} | {c['update_interval']} | "
                         f"{c['swaps_per_update']} | {c['strategy']} |")
    lines += ["", "Predicted against measured (perplexity predicted as the full model's on this text times "
              "exp(predicted NLL increase)):", "",
              "| configuration | budget (B) | memory pred / meas (B) | decode ms/token pred / meas | KL pred / meas "
              "| perplexity pred / meas |", "|---|---|---|---|---|---|"]
    for b in budgets:
        for v in ("planned", "uniform", "uniform+schedule"):
            c = cells.get(f"{v}@{b}")
            if c is None or "predicted" not in c:
                continue
            p = c["predicted"]
            lines.append(
                f"| {v} @ {b} | {c['budget_bytes']} | {p['expert_bytes']} / {c['expert_bytes']} | "
                f"{1e3 * p['decode_s_per_token']:.2f} / {1e3 * c['decode_s_per_token']:.2f} "
                f"({_pct(p['decode_s_per_token'], c['decode_s_per_token'])}) | "
                f"{p['kl']:.4f} / {c['kl']:.4f} ({_pct(p['kl'], c['kl'])}) | "
                f"{p['perplexity']:.3f} / {math.exp(c['nll']):.3f} ({_pct(p['perplexity'], math.exp(c['nll']))}) |")
    return "\n".join(lines) + "\n"


def _pct(pred: float, meas: float) -> str:
    return "-" if meas == 0 else f"{100 * (pred - meas) / abs(meas):+.1f}%"


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = data["cells"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "ppl", "perplexity (held-out)"), (axes[1], "kl", "KL from full (nats/token)")):
        for v, marker in zip(VARIANTS, "osD^", strict=True):
            pts = sorted((float(c["budget"].rstrip("%")), math.exp(c["nll"]) if metric == "ppl" else c["kl"])
                         for c in cells.values() if c.get("variant") == v)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, label=v)
        if metric == "ppl":
            ax.axhline(math.exp(cells["full"]["nll"]), color="gray", linestyle="--", label="full model")
        ax.set_xlabel("expert memory budget (% of all experts)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"planner vs ablations, {Path(data['meta']['model']).name}, {data['meta']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m swapmoe.planner.ablation", description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--profile", default=None)
    p.add_argument("--text", default=None, help="held-out text to measure on")
    p.add_argument("--split", default=None, metavar="HELDOUT_DIR",
                   help="first write calibration.txt and eval.txt into --out from HELDOUT_DIR/<domain>.txt, then stop")
    p.add_argument("--out", default="runs/planner")
    p.add_argument("--budgets", default="25%,50%,75%")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.split:
        c, e = split_heldout(Path(args.split), Path(args.out))
        print(f"wrote {c} and {e}")
        return 0
    if not args.profile or not args.text:
        p.error("--profile and --text are needed (or --split)")
    run(args)
    print((Path(args.out) / "ablation.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
