"""What swapmoe's router hooks cost per decode token, against plain transformers on the same model.

Loads one checkpoint (default: the bundled reference model) as plain transformers and through
``swapmoe.load`` at several settings, and measures batch-1 greedy decode milliseconds per token
after a 32-token prompt. The runs alternate over ``--rounds`` rounds (the order rotating, after one
untimed model) and each setting reports its best round, so a busy machine (or a GPU still clocking up) does not decide the comparison. The
ratio column is against plain transformers.

    python benchmarks/overhead.py --device cpu --threads 1 --rounds 5 --out docs/results/overhead
    python benchmarks/overhead.py --device cuda --out runs/overhead        # on the GPU machine
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import swapmoe
from swapmoe.compat import cache_kwargs
from swapmoe.loader import default_model_path, resolve_dtype
from swapmoe.provenance import provenance

SETTINGS: dict[str, dict[str, Any]] = {
    "swapmoe 100%": {"memory_budget": "100%"},
    "swapmoe 50%, no swaps": {"memory_budget": "50%", "swaps_per_update": 0},
    "swapmoe 50%, exchange": {"memory_budget": "50%"},
    "swapmoe 50%, skip": {"memory_budget": "50%", "strategy": "skip"},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_ms(model: Any, tokens: int, warmup: int = 8) -> float:
    """Milliseconds per token of batch-1 greedy decode after a 32-token prompt."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
    cache = DynamicCache(config=model.config)
    tok = model(ids, **cache_kwargs(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
    for _ in range(warmup):
        tok = model(tok, **cache_kwargs(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
    _sync(device)
    start = time.perf_counter()
    for _ in range(tokens):
        tok = model(tok, **cache_kwargs(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
    _sync(device)
    return 1e3 * (time.perf_counter() - start) / tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="checkpoint (default: the bundled reference model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--tokens", type=int, default=96, help="decode tokens timed per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("runs/overhead"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    path = Path(args.model) if args.model else default_model_path()
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype)
    def load(name: str) -> Any:
        if name == "plain transformers":
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        return swapmoe.load(path, device=device, dtype=dtype, **SETTINGS[name])

    names = ["plain transformers", *SETTINGS]
    # an untimed first model: the first one a process runs measures slow (one-off set-up costs), and
    # the order rotates each round, so that no setting always runs first
    decode_ms(load(names[0]), 16)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            model = load(name)
            times[name].append(decode_ms(model, args.tokens))
            del model
            gc.collect()
    best = {n: min(t) for n, t in times.items()}
    base = best["plain transformers"]
    table = Table(title=f"decode ms/token, batch 1, best of {args.rounds} ({path.name}, {device}, {args.dtype})")
    for col in ("setting", "ms/token", "vs plain"):
        table.add_column(col, justify="right")
    for name, ms in best.items():
        table.add_row(name, f"{ms:.2f}", f"{ms / base:.3f}")
    Console().print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"model": str(path), "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
              "tokens": args.tokens, "rounds": args.rounds, "ms_per_token": best,
              "ratio_to_plain": {k: v / base for k, v in best.items()}, "all_rounds_ms": times,
              "provenance": provenance(device)}
    (args.out / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'overhead.json'}")


if __name__ == "__main__":
    main()
