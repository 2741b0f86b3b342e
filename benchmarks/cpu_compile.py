"""CPU decode with the step compiled by inductor (`--compile-step`) against the eager and static steps.

A CPU has no graph to capture, and transformers' eager forward pays Python and small-kernel overhead per
op. `swapmoe.load(compile_step=True)` on a CPU decodes on the static cache with the step compiled to
fused C++ by inductor. This loads the bundled reference model once, builds the three decoders side by
side, and times them through the package's one decode timing (swapmoe.engine.timing.time_decode) in
alternating rounds, teacher-forced on the same tokens: min and median ms/token, the one-off compile
time, and swaps. A table on stdout and a JSON with provenance.

    python benchmarks/cpu_compile.py --budget 50% --out docs/results/decode/cpu-compile-ref.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import swapmoe
from swapmoe.engine.decoder import Decoder
from swapmoe.engine.timing import time_decode
from swapmoe.provenance import provenance


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled reference model)")
    p.add_argument("--budget", default="50%")
    p.add_argument("--tokens", type=int, default=32, help="timed decode tokens per round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=Path("runs/cpu-compile.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    model = swapmoe.load(args.model, args.budget, device="cpu", update_interval=8)
    vocab = model.config.vocab_size
    rng = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (32,), generator=rng).tolist()
    feed = torch.randint(0, vocab, (args.tokens + 8,), generator=rng).tolist()
    decoders = {"eager (dynamic cache)": Decoder(model, "dynamic"), "static cache": Decoder(model, "static"),
                "static cache, compiled": Decoder(model, "static", compile_step=True)}
    t0 = time.perf_counter()
    time_decode(model, prompt, 2, feed=feed, warmup=1, decoder=decoders["static cache, compiled"])
    compile_s = time.perf_counter() - t0
    ms: dict[str, list[float]] = {name: [] for name in decoders}
    for r in range(args.rounds):
        for name in list(decoders) if r % 2 == 0 else list(reversed(decoders)):
            timing = time_decode(model, prompt, args.tokens, feed=feed, warmup=2, decoder=decoders[name])
            ms[name].append(1e3 * statistics.median(timing.step_s))
    rows = [{"setting": name, "ms": v, "ms_min": min(v), "ms_median": statistics.median(v),
             "tokens_per_s": 1e3 / statistics.median(v)} for name, v in ms.items()]
    base = rows[0]["ms_median"]
    table = Table(title=f"CPU decode, reference model at {args.budget} (threads {torch.get_num_threads()})")
    for col in ("setting", "ms/token min", "median", "tok/s", "vs eager"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["setting"], f"{row['ms_min']:.2f}", f"{row['ms_median']:.2f}", f"{row['tokens_per_s']:.0f}",
                      f"{base / row['ms_median']:.2f}x")
    console.print(table)
    console.print(f"compile (first compiled step): {compile_s:.1f} s; "
                  f"compiles: {decoders['static cache, compiled'].compiled.compiles}")
    result = {"budget": args.budget, "tokens": args.tokens, "rounds": args.rounds, "threads": torch.get_num_threads(),
              "compile_s": compile_s, "compiles": decoders["static cache, compiled"].compiled.compiles,
              "swaps": model.swapmoe.stats()["total"]["swaps"], **provenance("cpu"), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
