"""``swapmoe eval``, ``swapmoe sweep`` and ``swapmoe trace``: the trade-off, measured."""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from swapmoe.errors import SwapMoEError
from swapmoe.fused import DEFAULT_MOE_KERNEL
from swapmoe.provenance import provenance
from swapmoe.quant import FORMATS


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True)


def _stream(args: argparse.Namespace) -> tuple[Any, list[int]]:
    from swapmoe.cli import load_tokenizer, require_causal_checkpoint
    from swapmoe.evaluation.perplexity import tokenize_text

    require_causal_checkpoint(args.model, "reading a text stream", args.trust_remote_code)
    path = Path(args.text)
    if not path.is_file():
        raise SwapMoEError(f"text file {path} does not exist: pass --text FILE with the text to evaluate on")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SwapMoEError(f"{path} is not UTF-8 text: convert it first") from None
    tok = load_tokenizer(args.model, args.trust_remote_code)
    ids = tokenize_text(tok, text, args.max_tokens)
    if len(ids) < 2:
        raise SwapMoEError(f"{path} has fewer than 2 tokens: nothing to score")
    return tok, ids


def _load_kw(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "decay": args.decay,
                          "async_swaps": not args.sync_swaps, "allow_pickle": args.allow_pickle,
                          "cuda_graph": not getattr(args, "no_cuda_graph", False),
                          "moe_kernel": getattr(args, "moe_kernel", DEFAULT_MOE_KERNEL),
                          "trust_remote_code": args.trust_remote_code}
    if getattr(args, "expert_dtype", None) is not None:  # load_policy gives it to the swapmoe policies only
        kw["expert_dtype"] = args.expert_dtype
    if getattr(args, "profile", None) is not None:  # load_policy gives it to the planned policy only
        kw["profile"] = args.profile
    if args.update_interval is not None:
        kw["update_interval"] = args.update_interval
    if args.swaps_per_update is not None:
        kw["swaps_per_update"] = args.swaps_per_update
    return kw


def _policy_model(args: argparse.Namespace, policy: str, budget: str | None) -> Any:
    from swapmoe.baselines import load_policy

    kw = _load_kw(args)
    if getattr(args, "plan", None):
        kw.pop("profile", None)
        # a plan sets slots, schedule and strategy; flags given on the command line still win
        if policy not in ("swapmoe", "swapmoe-skip"):
            raise SwapMoEError("--plan applies to the swapmoe policy only (it chooses exchange or skip itself; "
                               "policy 'planned' plans at each budget from --profile)")
        if budget is not None and getattr(args, "memory_budget", None) is not None:
            raise SwapMoEError("give either --memory-budget or --plan, not both")
        import swapmoe

        strategy = getattr(args, "strategy", None)
        return swapmoe.load(args.model, plan=args.plan, **({"strategy": strategy} if strategy else {}), **kw)
    return load_policy(policy, args.model, budget, **kw)


def _release_device_memory() -> None:
    """Free a dropped model's device memory before the next one loads (its hooks make reference
    cycles, which only the garbage collector breaks)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reference(args: argparse.Namespace) -> Any:
    from swapmoe.baselines import load_policy

    # the reference is the original model: --expert-dtype does not apply to the full policy
    return None if args.no_reference else load_policy("full", args.model, None, **_load_kw(args))


def _evaluate(model: Any, ids: list[int], reference: Any, args: argparse.Namespace, console: Console,
              label: str) -> dict[str, Any]:
    from swapmoe.evaluation.compare import evaluate_stream

    with _progress(console) as prog:
        task = prog.add_task(label, total=len(ids) - 1)
        res = evaluate_stream(model, ids, reference=reference, window=args.window,
                              decode_tokens=args.decode_tokens, progress=lambda n: prog.advance(task, n))
    return res.to_dict()


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    _, ids = _stream(args)
    reference = _reference(args) if args.policy != "full" else None
    model = _policy_model(args, args.policy, args.memory_budget)
    row = _evaluate(model, ids, reference, args, console, f"{args.policy} @ {args.memory_budget or '100%'}")
    row.update(policy=args.policy, budget=args.memory_budget or "100%",
               provenance=provenance(next(model.parameters()).device))
    from swapmoe.evaluation.sweep import markdown_table

    sys.stdout.write(markdown_table({"cells": {"x": row}}))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    return 0


def cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    from swapmoe.baselines import POLICIES
    from swapmoe.evaluation.sweep import (
        grid,
        markdown_table,
        plans_table,
        plot,
        run_sweep,
        stream_fingerprint,
    )
    from swapmoe.loader import default_model_path

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise SwapMoEError(f"unknown policy {unknown[0]!r}; choose from: {', '.join(POLICIES)}")
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    from swapmoe.budget import parse_budget

    for b in budgets:
        parse_budget(b)  # malformed budgets fail before any work
    _, ids = _stream(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = Path(args.model) if args.model else default_model_path()
    meta = {"model": str(model_path.resolve()), "model_name": model_path.name, "text": str(Path(args.text).resolve()),
            "stream": stream_fingerprint(ids), "window": args.window, "tokens": len(ids) - 1,
            "decode_tokens": args.decode_tokens, "update_interval": args.update_interval,
            "swaps_per_update": args.swaps_per_update, "device": args.device, "dtype": args.dtype,
            "expert_dtype": args.expert_dtype}
    if "planned" in policies:
        if args.profile is None:
            raise SwapMoEError("policy 'planned' needs a profile: pass --profile profile.json (from `swapmoe profile`)")
        from swapmoe.planner.profile import read_profile

        meta["profile"] = str(Path(args.profile).resolve())
        meta["profile_stream"] = read_profile(args.profile)["meta"].get("stream")
    cells = grid(policies, budgets)
    reference: list[Any] = []

    def run_cell(policy: str, budget: str) -> dict[str, Any]:
        if not reference and not args.no_reference:
            reference.append(_reference(args))
        model = _policy_model(args, policy, budget)
        ref = reference[0] if reference else None
        # the full policy is scored against the reference too: its KL of 0 and agreement of 1 are
        # then measured (a separately loaded full model, bit for bit), not written down
        row = _evaluate(model, ids, ref, args, console, f"{policy} @ {budget}")
        row["provenance"] = provenance(next(model.parameters()).device)
        if getattr(model, "swapmoe_plan", None) is not None:  # planned: what the planner chose
            row["plan"] = json.loads(model.swapmoe_plan.to_json())
        console.print(f"{policy} @ {budget}: perplexity {row['perplexity']:.3f}, "
                      f"decode {1e3 * (row['decode_s_per_token'] or float('nan')):.2f} ms/token")
        del model
        _release_device_memory()
        return row

    if args.warmup and cells:
        # The first model a process runs pays one-off set-up costs (CUDA context, kernel selection,
        # allocator growth, GPU clocks ramping up) that would otherwise land on whichever cell runs
        # first. On the H200 they last seconds, not steps: the first model measured 69 ms/token over
        # 48 decode steps after 4 warm-up steps, and 31 ms/token when loaded again. So the warm-up
        # runs for a time, not a number of tokens.
        light = [c for c in cells if c[0] not in ("full", "static", "accelerate-offload")]
        policy, budget = (light or cells)[0]
        model = _policy_model(args, policy, budget)
        from swapmoe.evaluation.compare import evaluate_stream

        least = args.warmup_seconds
        if least is None:  # GPUs need seconds to settle; a CPU is warm after one pass
            least = 10.0 if next(model.parameters()).device.type == "cuda" else 0.0
        start = time.perf_counter()
        while True:
            evaluate_stream(model, ids[: 2 * args.window + 1], window=args.window, decode_tokens=16)
            if time.perf_counter() - start >= least:
                break
        del model
        _release_device_memory()
    data = run_sweep(cells, out / "sweep.json", meta, run_cell,
                     on_skip=lambda key: console.print(f"{key}: done already (resumed)"),
                     on_error=lambda key, msg: console.print(f"[red]{key} failed:[/red] {msg}", highlight=False))
    table = markdown_table(data)
    plans = plans_table(data)
    if plans:
        table += "\nThe planner's choices (policy planned):\n\n" + plans
    (out / "sweep.md").write_text(table, encoding="utf-8")
    paths = plot(data, out)
    sys.stdout.write(table)
    if data.get("failed"):
        console.print(f"[yellow]{len(data['failed'])} cell(s) failed[/yellow] (not saved; a rerun tries them again): "
                      + ", ".join(data["failed"]))
    console.print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}, " + ", ".join(str(p) for p in paths))
    return 0


def cmd_trace(args: argparse.Namespace, console: Console) -> int:
    import swapmoe
    from swapmoe.evaluation.trace import activation_counts, heatmap, locality_stats, record_routing

    _, ids = _stream(args)
    model = swapmoe.load(args.model, "100%", device=args.device, dtype=args.dtype, expert_dtype=args.expert_dtype,
                         trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    layers = model.swapmoe.layers
    chosen = [int(x) for x in args.layers.split(",")] if args.layers else sorted({0, len(layers) // 2, len(layers) - 1})
    bad = [c for c in chosen if not 0 <= c < len(layers)]
    if bad:
        raise SwapMoEError(f"--layers {bad[0]} is out of range: the model has MoE layers 0..{len(layers) - 1}")
    with _progress(console) as prog:
        task = prog.add_task("routing", total=len(ids))
        routes = record_routing(model, ids, window=args.window, progress=lambda n: prog.advance(task, n))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    counts = {}
    for i in chosen:
        e = layers[i].layer.num_experts
        stats[i] = locality_stats(routes[i], e, args.heat_window)
        counts[i] = activation_counts(routes[i], e, args.heat_window)
    png = heatmap(counts, out / "expert_heatmap.png",
                  f"experts chosen per window of {args.heat_window} tokens ({Path(args.text).name})")
    record = {"provenance": provenance(next(model.parameters()).device), "layers": stats}
    (out / "locality.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for i, s in stats.items():
        ideal = ", ".join(f"S={k}: {v:.3f}" for k, v in s["ideal_cache_hit_rate"].items())
        lru = ", ".join(f"S={k}: {v:.3f}" for k, v in s["lru_cache_hit_rate"].items())
        console.print(f"layer {i}: top-{s['top_k']} of {s['experts']}; window top-k repeat "
                      f"{s['window_topk_repeat']:.3f}; token repeat {s['token_repeat']:.3f}\n"
                      f"  ideal cache hit rate {ideal}\n  LRU cache hit rate   {lru}")
    console.print(f"wrote {png} and {out / 'locality.json'}")
    return 0


def add_parsers(sub: Any, add_model_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register eval, sweep and trace on the ``swapmoe`` parser."""
    from swapmoe.baselines import POLICIES

    def stream_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--text", required=True, help="UTF-8 text file, read as one stream in order")
        p.add_argument("--window", type=int, default=256, help="tokens per forward (batch 1)")
        p.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the text")

    def eval_args(p: argparse.ArgumentParser) -> None:
        stream_args(p)
        p.add_argument("--decode-tokens", type=int, default=64, help="decode steps timed for latency (0: skip)")
        p.add_argument("--no-reference", action="store_true",
                       help="skip the full model (no agreement or KL; for models too big to load whole)")

    p = sub.add_parser("eval", help="one policy on a text stream: perplexity, agreement, KL, latency, memory")
    add_model_arguments(p)
    eval_args(p)
    p.add_argument("--policy", choices=POLICIES, default="swapmoe")
    p.add_argument("--profile", default=None, help="profile.json for policy 'planned' (planned at --memory-budget)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sweep", help="policies x budgets grid: JSON, Markdown table, PNG plots; resumable")
    add_model_arguments(p)
    eval_args(p)
    p.add_argument("--budgets", default="12.5%,25%,50%,75%,100%")
    p.add_argument("--policies", default="full,swapmoe,swapmoe-skip,ondemand,random-keep,magnitude-keep")
    p.add_argument("--out", default="runs/sweep", help="folder for sweep.json, sweep.md and the plots")
    p.add_argument("--profile", default=None,
                   help="profile.json for policy 'planned': `swapmoe plan`'s choice at each budget (its slots, "
                        "schedule, strategy and precision per layer)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the untimed warm-up run before the first cell")
    p.add_argument("--warmup-seconds", type=float, default=None,
                   help="least time the untimed warm-up runs (default: 10 s on CUDA, one pass on CPU)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("trace", help="expert activation heatmap and temporal-locality statistics")
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: bundled model)")
    stream_args(p)
    p.add_argument("--layers", default=None, help="MoE layers to draw, e.g. 0,3,7 (default: first, middle, last)")
    p.add_argument("--heat-window", type=int, default=64, help="tokens per heatmap row")
    p.add_argument("--out", default="runs/trace")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--expert-dtype", default=None, choices=list(FORMATS),
                   help="hold experts quantised while routing is traced (docs/quantization.md)")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_trace)
