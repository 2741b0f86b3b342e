"""``swapmoe eval-ppl``: perplexity of a text file read as one stream, within a memory budget (issue 4).

The simplest accuracy figure: one model, one budget, the file in order in fixed windows at batch 1.
``swapmoe eval`` (``commands.py``) adds reference-model agreement, baselines and latency.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from swapmoe.budget import format_bytes
from swapmoe.errors import SwapMoEError
from swapmoe.provenance import provenance

# config keys that give a model's experts per layer, across the families transformers knows
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def add_eval_ppl_parser(sub: Any, add_model_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``eval-ppl`` on the CLI's subparsers (``add_model_arguments``: the shared model options)."""
    p = sub.add_parser("eval-ppl", help="perplexity of a text file read as one continuous stream, in fixed windows")
    add_model_arguments(p)
    p.add_argument("--text", "-t", required=True, type=Path, help="UTF-8 text file, read whole and in order")
    p.add_argument("--window", "-w", type=int, default=512,
                   help="tokens per forward pass (batch 1; the reference model was trained on 512)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the file")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line on stdout")
    p.set_defaults(func=cmd_eval_ppl)


def is_moe_config(config: dict) -> bool:
    """Whether a config.json describes a model with experts (dense models are evaluated whole)."""
    return any(isinstance(config.get(k), int) and config[k] > 1 for k in _EXPERT_COUNT_KEYS)


def load_dense(path: Path, args: argparse.Namespace) -> Any:
    """A dense checkpoint (e.g. the reference model's dense twin), loaded whole with transformers."""
    from transformers import AutoModelForCausalLM

    from swapmoe.checkpoint import check_checkpoint
    from swapmoe.loader import resolve_device, resolve_dtype

    ckpt = check_checkpoint(path, allow_pickle=args.allow_pickle)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            ckpt.path, dtype=resolve_dtype(args.dtype), use_safetensors=ckpt.use_safetensors,
            trust_remote_code=args.trust_remote_code,
        )
    except (OSError, RuntimeError, ValueError) as e:
        raise SwapMoEError(f"transformers could not load {path}: {str(e).splitlines()[0]}") from None
    return model.to(resolve_device(args.device)).eval()


def cmd_eval_ppl(args: argparse.Namespace, console: Console) -> int:
    from swapmoe.checkpoint import check_checkpoint
    from swapmoe.cli import (
        format_rate,
        load_from_args,
        load_tokenizer,
        require_causal_checkpoint,
        stats_table,
    )
    from swapmoe.evaluation.perplexity import stream_perplexity, tokenize_text
    from swapmoe.loader import default_model_path

    if args.window < 1:
        raise SwapMoEError("--window must be at least 1")
    try:
        text = args.text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SwapMoEError(f"cannot read {args.text} as UTF-8 text: {e}") from None
    path = Path(args.model) if args.model is not None else default_model_path()
    moe = is_moe_config(check_checkpoint(path, allow_pickle=args.allow_pickle).config)
    require_causal_checkpoint(path, "perplexity of a text stream", args.trust_remote_code)
    tok = load_tokenizer(args.model, args.trust_remote_code)
    ids = tokenize_text(tok, text, args.max_tokens)
    if len(ids) < 2:
        raise SwapMoEError(f"{args.text} gives {len(ids)} token(s): need at least 2 to score one")
    if moe:
        model = load_from_args(args)
    else:
        if args.memory_budget is not None or args.plan is not None:
            console.print("[yellow]note:[/yellow] dense model: every weight stays resident, the budget does not apply")
        model = load_dense(path, args)

    columns = (TextColumn("[bold]eval-ppl"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("tokens", total=len(ids) - 1)
        result = stream_perplexity(model, ids, args.window, progress=lambda n: progress.advance(task, n))

    if moe:
        console.print(stats_table(model.swapmoe.stats(), title=f"swapmoe eval-ppl: {args.text}"))
        budget = model.swapmoe.stats()["total"]
        share = budget["resident_bytes"] / budget["total_expert_bytes"] if budget["total_expert_bytes"] else 1.0
        where = (f"{format_bytes(budget['resident_bytes'])} of {format_bytes(budget['total_expert_bytes'])} "
                 f"expert weights resident ({share:.0%})")
        extra = (f"hit rate {format_rate(result.hit_rate)}, swaps {result.swaps} "
                 f"({format_bytes(result.bytes_copied or 0)} copied)")
    else:
        where, extra = "dense model, all weights resident", "hit rate n/a, swaps 0"
    print(f"perplexity {result.perplexity:.3f}  (mean NLL {result.nll:.4f} nats)")
    print(f"tokens {result.tokens} in {result.windows} windows of {result.window}; {extra}")
    print(f"{where}; {result.seconds:.1f}s, {result.tokens_per_second:.0f} tokens/s on {model.device}")
    if args.json:
        record = {"model": str(path), "text": str(args.text), "memory_budget": args.memory_budget,
                  "moe": moe, **{k: getattr(result, k) for k in result.__dataclass_fields__},
                  "provenance": provenance(model.device)}
        print(json.dumps(record))
    return 0
