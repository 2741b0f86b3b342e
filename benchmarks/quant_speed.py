"""Quantising experts at load on the CPU: HQQ's zero-point refinement (int3, int2) before and after
its in-place, cache-sized form (issue 14).

``swapmoe.quant.refine_zero`` used to allocate ~15 full-size float32 temporaries per iteration (20
iterations); it now runs the same operations in place on four reused buffers, a cache-sized chunk of
groups at a time, with bit-identical results (tests/test_quant.py). This measures both in one process,
side by side, in alternating rounds (the machine is shared: report the best and the median):

* ``quantise``: ``quantise(w, fmt)`` of ``w = randn(8, 2048, 2048)`` bfloat16 (8 OLMoE experts'
  ``gate_up_proj``, 32M weights), and whether both forms give equal parts;
* ``load``: ``swapmoe.load(<checkpoint>, slots=..., expert_dtype=fmt, device="cpu")`` of a 2-layer
  OLMoE-1B-7B-shaped checkpoint (``benchmarks/budgets.py``'s ``build_checkpoint``, fused layout), total
  seconds and ``model.swapmoe.load_seconds`` (its "experts" phase is where the quantisation runs).

The "before" form is the old function, copied below, swapped in for the duration of its call only.

    PYTHONPATH=src python benchmarks/quant_speed.py --rounds 3 --load-rounds 1 \
        --checkpoint /tmp/swapmoe-bench-olmoe-1b-7b-2-fused --out docs/results/quant/load-speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def refine_zero_full_size(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int, iters: int = 20,
                          ) -> torch.Tensor:
    """``swapmoe.quant.refine_zero`` as it was at commit ffe2313 (full-size temporaries)."""
    lp, beta, kappa = 0.7, 10.0, 1.01
    inv = 1.0 / s.unsqueeze(-1)
    zero = z.unsqueeze(-1)
    best_zero, best_err = zero, torch.full_like(zero, float("inf"))
    for _ in range(iters):
        q = torch.round(x * inv + zero).clamp(0, qmax)
        r = (q - zero) * s.unsqueeze(-1)
        d = x - r
        err = d.abs().mean(-1, keepdim=True)
        better = err < best_err
        best_zero, best_err = torch.where(better, zero, best_zero), torch.where(better, err, best_err)
        e = torch.sign(d) * torch.relu(d.abs() - (1.0 / beta) * (d.abs() + 1e-8).pow(lp - 1))
        zero = (q - (x - e) * inv).mean(-1, keepdim=True)
        beta *= kappa
    return best_zero.squeeze(-1)


@contextlib.contextmanager
def implementation(name: str) -> Iterator[None]:
    """``refine_zero`` as ``name`` ("before" or "after") for the duration of the block only."""
    import swapmoe.quant as quant

    current = quant.refine_zero
    if name == "before":
        quant.refine_zero = refine_zero_full_size
    try:
        yield
    finally:
        quant.refine_zero = current


def summary(times: list[float]) -> dict[str, float]:
    return {"best_s": min(times), "median_s": statistics.median(times), "all_s": times}


def time_quantise(fmts: list[str], experts: int, rounds: int) -> dict[str, Any]:
    from swapmoe.quant import quantise

    torch.manual_seed(0)
    w = torch.randn(experts, 2048, 2048, dtype=torch.bfloat16)
    out: dict[str, Any] = {}
    for fmt in fmts:
        times: dict[str, list[float]] = {"before": [], "after": []}
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for r in range(rounds):
            for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
                with implementation(name):
                    t0 = time.perf_counter()
                    parts[name] = quantise(w, fmt)
                    times[name].append(time.perf_counter() - t0)
                print(f"quantise {fmt} {name}: {times[name][-1]:.2f} s", flush=True)
        same = all(torch.equal(parts["before"][p], parts["after"][p]) for p in parts["before"])
        out[fmt] = {n: summary(t) for n, t in times.items()} | {
            "bit_identical": same, "speedup_best": min(times["before"]) / min(times["after"])}
    return out


def time_load(path: Path, fmt: str, slots: int, rounds: int, save: Any) -> dict[str, Any]:
    """Each load as it finishes is saved (``save(partial)``): the "before" form takes many minutes."""
    import swapmoe

    times: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    out = {"checkpoint": str(path), "expert_dtype": fmt, "slots_per_layer": slots, "rounds": times}
    for r in range(rounds):
        for name in (("after", "before") if r % 2 == 0 else ("before", "after")):
            with implementation(name):
                t0 = time.perf_counter()
                model = swapmoe.load(path, slots=[slots] * 2, expert_dtype=fmt, device="cpu")
                total = time.perf_counter() - t0
            times[name].append({"total_s": total, **{f"{k}_s": v for k, v in model.swapmoe.load_seconds.items()}})
            print(f"load {fmt} {name}: {times[name][-1]}", flush=True)
            save(out)
            del model
            gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of quantise (best and median)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--formats", default="int3,int2")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a 2-layer OLMoE checkpoint: also time the load")
    parser.add_argument("--load-rounds", type=int, default=1)
    parser.add_argument("--slots", type=int, default=16, help="slots per MoE layer of the load (of 64)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from swapmoe.provenance import provenance

    record: dict[str, Any] = {"provenance": provenance("cpu"), "threads": torch.get_num_threads(),
                              "command": "PYTHONPATH=src python benchmarks/quant_speed.py " + " ".join(
                                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
                              "weight": f"randn({args.experts}, 2048, 2048) bfloat16"}

    def save(load: dict[str, Any] | None = None) -> None:
        if load is not None:
            record["load"] = load
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")

    record["quantise"] = time_quantise(args.formats.split(","), args.experts, args.rounds)
    save()
    print(json.dumps(record["quantise"], indent=2), flush=True)
    if args.checkpoint is not None:
        time_load(args.checkpoint, "int3", args.slots, args.load_rounds, save)


if __name__ == "__main__":
    main()
