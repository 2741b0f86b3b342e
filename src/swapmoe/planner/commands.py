"""``swapmoe profile`` and ``swapmoe plan``: measure the model on this machine, then choose a plan."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from swapmoe.budget import format_bytes
from swapmoe.errors import SwapMoEError
from swapmoe.quant import FORMATS


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SwapMoEError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise SwapMoEError(f"{name} must be positive integers, got {text!r}")
    return vals


def _fractions(text: str) -> tuple[float, ...]:
    out = []
    for x in text.split(","):
        x = x.strip()
        if not x:
            continue
        try:
            v = float(x[:-1]) / 100 if x.endswith("%") else float(x)
        except ValueError:
            raise SwapMoEError(f"--uniform must be shares like 25%,50%,75%, got {text!r}") from None
        if not 0 < v < 1:
            raise SwapMoEError(f"--uniform shares must be between 0% and 100%, got {x!r}")
        out.append(v)
    return tuple(out)


def _strategies(text: str) -> tuple[str, ...]:
    out = tuple(s.strip() for s in text.split(",") if s.strip())
    if not out or any(s not in ("exchange", "skip") for s in out):
        raise SwapMoEError(f"--strategies takes exchange and/or skip, got {text!r}")
    return out


def _formats(text: str, flag: str = "--formats") -> tuple[str, ...]:
    """``bf16,int8,int4`` (any of :data:`swapmoe.quant.FORMATS`), or ``none``."""

    if text.strip().lower() == "none":
        return ()
    out = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    bad = [f for f in out if f not in FORMATS]
    if not out or bad:
        raise SwapMoEError(f"{flag} takes formats among {', '.join(FORMATS)} (comma-separated) or none, got {text!r}")
    return out


def cmd_profile(args: argparse.Namespace, console: Console) -> int:
    from transformers.utils import logging as hf_logging

    from swapmoe.cli import load_tokenizer, require_causal_checkpoint
    from swapmoe.evaluation.perplexity import tokenize_text
    from swapmoe.planner.perfmodel import error_table, fit, prediction_errors
    from swapmoe.planner.profile import ProfileSettings, holdout_runs, profile, summary

    require_causal_checkpoint(args.model, "profiling on calibration text", args.trust_remote_code)
    path = Path(args.calibration)
    if not path.is_file():
        raise SwapMoEError(f"calibration file {path} does not exist: pass --calibration FILE (UTF-8 text like "
                           "what the model will serve)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SwapMoEError(f"{path} is not UTF-8 text: convert it first") from None
    for name, v in (("--max-tokens", args.max_tokens), ("--window", args.window), ("--layer-points", args.layer_points)):
        if v < 1:
            raise SwapMoEError(f"{name} must be >= 1")
    if args.decode_tokens < 1 or args.holdout < 0:
        raise SwapMoEError("--decode-tokens must be >= 1 and --holdout >= 0")
    intervals = _ints(args.intervals, "--intervals")
    settings = ProfileSettings(
        max_tokens=args.max_tokens, window=args.window, decode_tokens=args.decode_tokens,
        layer_points=args.layer_points, uniform_fractions=_fractions(args.uniform), intervals=intervals,
        reference_interval=args.reference_interval, holdout=args.holdout, strategies=_strategies(args.strategies), timing_repeats=args.timing_repeats,
        seed=args.seed, decay=args.decay, formats=_formats(args.formats),
    )
    tok = load_tokenizer(args.model, args.trust_remote_code)
    ids = tokenize_text(tok, text, args.max_tokens)
    if len(ids) < 2:
        raise SwapMoEError(f"{path} has fewer than 2 tokens: nothing to profile on")
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise SwapMoEError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # one progress bar: ours
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console, transient=True)
    resumed = []
    with progress:
        task = progress.add_task("profiling", total=None)

        def on_step(step: Any) -> None:
            if step.done:
                resumed.append(step.key)
            progress.update(task, advance=1, description=f"profiling ({step.key[:60]})")

        data = profile(args.model, ids, args.out, settings, device=args.device, dtype=args.dtype,
                       calibration=str(path.resolve()), on_plan=lambda n: progress.update(task, total=n),
                       on_step=on_step, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                       cuda_graph=not args.no_cuda_graph, expert_dtype=args.expert_dtype)
    if len(resumed) > 1:
        console.print(f"resumed: {len(resumed) - 1} measurement(s) were already in {args.out}")
    s = summary(data)
    m = data["model"]
    console.print(
        f"{m['num_layers']} MoE layers x {m['num_experts'][0]} experts (top-{m['top_k'][0]}), "
        f"{format_bytes(s['expert_bytes'])} per expert, {format_bytes(s['layer_bytes'])} per layer, "
        f"{format_bytes(m['total_expert_bytes'])} of experts in all\n"
        f"per layer at batch 1: expert {s['expert_compute_ms']:.3f} ms, MoE block decode {s['layer_decode_ms']:.3f} ms, "
        f"prefill {s['layer_prefill_ms_per_token']:.4f} ms/token\n"
        f"one expert to the device {s['transfer_ms']:.3f} ms ({s['transfer_gb_per_s']:.2f} GB/s"
        f"{', pinned' if data['timing']['pinned'] else ''}); one update {s['update_ms']:.3f} ms "
        f"(on the compute path {s['update_submit_ms']:.3f} ms)\n"
        f"full model: decode {s['full_decode_ms']:.2f} ms/token, perplexity {s['full_perplexity']:.3f} "
        f"on {data['meta']['tokens']} calibration tokens", highlight=False)
    held = holdout_runs(data)
    if held:
        table = error_table(prediction_errors(fit(data), held))
        sys.stdout.write("prediction error on held-out configurations (not fitted on):\n" + table)
    console.print(f"wrote {args.out}")
    return 0


def _check_model(args: argparse.Namespace, data: dict[str, Any], console: Console) -> None:
    """The profile must describe this model (same MoE structure); warn when its weights changed."""
    from swapmoe.inspect import describe
    from swapmoe.loader import default_model_path
    from swapmoe.planner.profile import model_fingerprint

    path = Path(args.model) if args.model else default_model_path()
    info = describe(path, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    m = data["model"]
    if info.num_experts != m["num_experts"] or info.top_k != m["top_k"]:
        raise SwapMoEError(f"the profile {args.profile} was made for another model ({m['num_layers']} MoE layers, "
                           f"{m['num_experts'][0]} experts) than {path}: run `swapmoe profile {path} ...` first")
    if model_fingerprint(info.path) != data["meta"].get("model_fingerprint"):
        console.print(f"[yellow]warning:[/yellow] {path} changed since the profile was made (config or weights): "
                      "its accuracy figures may be stale; run `swapmoe profile` again", highlight=False)


def _figures(p: Any, budget: int) -> str:
    return (f"expert memory {format_bytes(p.expert_bytes)} ({100 * p.expert_bytes / budget:.1f}% of the budget), "
            f"decode {1e3 * p.decode_s_per_token:.3f} ms/token, KL {p.kl:.4f}, perplexity {p.perplexity:.3f}")


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    from swapmoe.planner.make import base_format, layer_format, make_plan
    from swapmoe.planner.perfmodel import fit
    from swapmoe.planner.profile import read_profile
    from swapmoe.planner.search import SearchSpace, compare_methods, parse_latency, uniform_config

    data = read_profile(args.profile)
    _check_model(args, data, console)
    pm = fit(data)
    latency = parse_latency(args.latency_budget) if args.latency_budget else None
    intervals = _ints(args.intervals, "--intervals") if args.intervals else tuple(data["grid"]["intervals"])
    strategies = tuple(s for s in _strategies(args.strategies) if s in pm.strategies)
    if not strategies:
        raise SwapMoEError(f"the profile has no figures for --strategies {args.strategies} (profiled: "
                           f"{', '.join(pm.strategies)}): profile them with `swapmoe profile --strategies ...`")
    formats = None
    if args.formats:
        formats = tuple(dict.fromkeys(layer_format(data, f) for f in _formats(args.formats)))
        missing = [f for f in formats if f is not None and f not in pm.format_bytes]
        if missing or not formats:
            raise SwapMoEError(f"the profile has no figures for format {(missing or ['none'])[0]} (profiled: "
                               f"{', '.join([str(base_format(data)), *pm.format_bytes])}): profile it with "
                               "`swapmoe profile --formats ...`")
    space = SearchSpace(intervals=intervals, swaps=_ints(args.swaps, "--swaps"), strategies=strategies,
                        static=not args.no_static, static_interval=data["grid"]["reference_interval"],
                        formats=formats)
    metric = "nll" if args.objective == "ppl" else "kl"
    if args.tolerance < 0:
        raise SwapMoEError("--tolerance must be >= 0")
    if args.method == "compare":
        from swapmoe.budget import parse_budget

        budget = parse_budget(args.memory_budget).resolve(data["model"].get("share_of_bytes", pm.total_bytes))
        results = compare_methods(pm, budget, latency, space, metric)
        t = Table(title="search methods on the same problem")
        for col in ("method", "objective", "configurations looked at", "seconds"):
            t.add_column(col, justify="right")
        for r in results:
            t.add_row(r.method, f"{r.objective:.6f}", str(r.evaluated), f"{r.seconds:.3f}")
        console.print(t)
    planned = make_plan(data, args.memory_budget, latency, "dp" if args.method == "compare" else args.method,
                        space, metric, args.tolerance, args.profile, pm)
    plan, result, budget = planned.plan, planned.result, planned.budget_bytes
    cfg, pred = result.config, result.prediction
    plan.save(args.out)
    base_min = sum(b * k for b, k in zip(pm.expert_bytes, pm.top_k, strict=True))
    uni = uniform_config(pm, budget) if budget >= base_min else None  # below: only quantised layers fit
    precision = ""
    if isinstance(plan.expert_dtype, list):
        precision = f"  precision        {','.join(str(f) for f in plan.expert_dtype)} (per MoE layer)\n"
    elif plan.expert_dtype is not None:
        precision = f"  precision        {plan.expert_dtype} (every MoE layer)\n"
    if uni is not None:
        uniform = (f"  uniform          {_figures(pm.predict(uni), budget)} (slots {','.join(map(str, uni.slots))}"
                   + (f", {base_format(data)}" if pm.format_bytes else "") + ", every 16 tokens, 1 swap, exchange)\n")
    else:
        uniform = f"  uniform          top-k experts per layer in {base_format(data)} do not fit\n"
    console.print(
        f"[bold]plan[/bold] for {args.memory_budget} = {format_bytes(budget)} of experts"
        + (f" and {1e3 * latency:.3f} ms/token" if latency else "") + "\n"
        f"  slots per layer  {','.join(map(str, cfg.slots))}\n" + precision
        + ("  schedule         the resident sets never change (no updates)" if cfg.swaps_per_update == 0 else
           f"  schedule         update every {cfg.update_interval} token(s), at most {cfg.swaps_per_update} swap(s) "
           "per layer") + f", strategy {cfg.strategy}\n"
        f"  planned          {_figures(pred, budget)}\n" + uniform
        + "  (predicted by the performance model fitted to the profile)", highlight=False)
    console.print(f"{result.method}: {result.evaluated} configurations looked at in {result.seconds:.3f} s; "
                  f"wrote {args.out}", highlight=False)
    if args.json:
        sys.stdout.write(json.dumps(json.loads(plan.to_json())) + "\n")
    return 0


def add_parsers(sub: Any, add_model_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``profile`` and ``plan`` on the ``swapmoe`` parser.

    ``add_model_arguments`` (the budget options of generate/serve) is not used: a profile measures
    many configurations, and a plan is what chooses them.
    """
    del add_model_arguments

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: bundled model)")
        p.add_argument("--allow-pickle", action="store_true", help="allow .bin (pickle) weights: only for trusted files")
        p.add_argument("--trust-remote-code", action="store_true", help="run code shipped in the model directory")

    p = sub.add_parser("profile", help="measure memory, compute, copy and accuracy profiles: profile.json (resumable)")
    model_args(p)
    p.add_argument("--calibration", required=True, help="UTF-8 text like the workload, read as one stream")
    p.add_argument("--out", default="profile.json", help="profile file, written after every measurement")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--expert-dtype", default=None, choices=list(FORMATS),
                   help="profile the model with its experts held in this format (the full model in it is the "
                        "reference; bytes are its bytes); `swapmoe plan` writes it into the plan")
    p.add_argument("--max-tokens", type=int, default=2048, help="calibration tokens used (the first ones)")
    p.add_argument("--window", type=int, default=256, help="tokens per forward (batch 1)")
    p.add_argument("--decode-tokens", type=int, default=64, help="decode steps timed per latency measurement")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="time decode steps as eager forwards, not CUDA graph replays (CUDA only)")
    p.add_argument("--layer-points", type=int, default=6, help="slot counts per layer in the per-layer profile")
    p.add_argument("--uniform", default="25%,50%,75%", help="uniform budgets profiled (plus the minimum)")
    p.add_argument("--intervals", default="1,4,16,64,256", help="update intervals profiled (tokens)")
    p.add_argument("--reference-interval", type=int, default=16, help="interval of the per-layer and uniform runs")
    p.add_argument("--strategies", default="exchange,skip", help="Masked Gating strategies profiled (exchange needed)")
    p.add_argument("--holdout", type=int, default=4, help="random configurations measured for the error table")
    p.add_argument("--formats", default=",".join(FORMATS),
                   help="formats each MoE layer is profiled in besides --expert-dtype, one layer at a time, "
                        "so that `swapmoe plan` can choose a precision per layer ('none': skip)")
    p.add_argument("--timing-repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--decay", type=float, default=0.98, help="per-token decay of expert importance")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("plan", help="choose slots per layer and the update schedule for a budget: plan.json")
    model_args(p)
    p.add_argument("--memory-budget", "-m", required=True, help="expert bytes on the device: '6GiB' or '40%%'")
    p.add_argument("--latency-budget", default=None, help="predicted decode time per token: '20ms' or '50tok/s'")
    p.add_argument("--profile", default="profile.json", help="from `swapmoe profile`")
    p.add_argument("--out", default="plan.json")
    p.add_argument("--method", choices=["dp", "ga", "exhaustive", "compare"], default="dp",
                   help="dp: exact knapsack over layers (default); ga: genetic algorithm; compare: run all")
    p.add_argument("--objective", choices=["kl", "ppl"], default="kl",
                   help="minimise KL from the full model (default) or perplexity")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="accept a penalty within this relative margin of the best for lower latency")
    p.add_argument("--intervals", default=None, help="update intervals to consider (default: the profiled ones)")
    p.add_argument("--swaps", default="1,2", help="swaps per update to consider")
    p.add_argument("--strategies", default="exchange,skip")
    p.add_argument("--no-static", action="store_true", help="do not consider plans that never swap")
    p.add_argument("--formats", default=None,
                   help="formats a MoE layer may take, e.g. bf16,int4 (default: every format the profile measured)")
    p.add_argument("--json", action="store_true", help="also print the plan as JSON on stdout")
    p.set_defaults(func=cmd_plan)
