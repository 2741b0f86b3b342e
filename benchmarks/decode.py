"""Batch-1 decode speed: plain transformers, swapmoe with one CUDA graph replay per token, and the baselines.

Builds a model of a published MoE architecture with random weights (benchmarks/budgets.py ARCHS),
loads every setting side by side in one process, and times them in alternating rounds through the
one decode timing of the package (swapmoe.engine.timing.time_decode), teacher-forced on the same
token stream. Per setting: ms/token (min and median over rounds), tokens/s, share of the roofline
(weight bytes read per token over measured device bandwidth), and from the profiler over a few
tokens: GPU-busy ms/token, kernels/token and host syncs/token; hit rate and swaps over the timed
tokens; device memory split. A table on stdout and a JSON with torch, transformers, GPU and commit.

    python benchmarks/decode.py --arch olmoe-1b-7b --out runs/decode       # on the GPU machine
    python benchmarks/decode.py --arch tiny --device cpu --out runs/tiny     # smoke test anywhere
    python benchmarks/decode.py --arch olmoe-1b-7b --moe-kernel transformers,auto \
        --settings "swapmoe 100%, graph;swapmoe 50%, graph;plain transformers, graph"   # fused experts or not
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budgets import ARCHS, build_checkpoint, bytes_per_token, copy_bandwidth, weight_split  # noqa: E402

import swapmoe  # noqa: E402
from swapmoe.engine.decoder import Decoder  # noqa: E402
from swapmoe.engine.timing import time_decode  # noqa: E402
from swapmoe.fused import DEFAULT_MOE_KERNEL  # noqa: E402
from swapmoe.provenance import provenance  # noqa: E402

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
               "aten::_local_scalar_dense", "cudaMemcpy")


#: the planner's per-layer formats for the reference model at a 50% budget (docs/results/quant/mixed-sweep)
MIXED_50 = ("int8", "int8", "int4", "int8", "int8", "int8", "int8", "int8")


def settings(compile_step: bool = False) -> list[tuple[str, str, dict[str, Any], str]]:
    """(name, loader, load kwargs, decode mode); ``compile_step`` adds the graph settings whose captured
    step is compiled by inductor first (Decoder(compile_step=True))."""
    rows = [
        ("plain transformers, eager", "plain", {}, "dynamic"),
        ("plain transformers, graph", "plain", {}, "graph"),
        ("swapmoe 100%, graph", "swapmoe", {"memory_budget": "100%"}, "graph"),
        ("swapmoe 50%, graph", "swapmoe", {"memory_budget": "50%"}, "graph"),
        ("swapmoe 50%, graph, unfused router", "swapmoe", {"memory_budget": "50%"}, "graph-unfused"),
        ("swapmoe 50% skip, graph", "swapmoe", {"memory_budget": "50%", "strategy": "skip"}, "graph"),
        ("swapmoe 25%, graph", "swapmoe", {"memory_budget": "25%"}, "graph"),
        ("swapmoe 50%, eager", "swapmoe", {"memory_budget": "50%"}, "dynamic"),
        # issue 14: quantised experts in the graph, at the same slot count as bf16 50% and at the same bytes
        ("swapmoe int8, slots of 50%, graph", "swapmoe", {"slots_fraction": 0.5, "expert_dtype": "int8"}, "graph"),
        ("swapmoe int4, slots of 50%, graph", "swapmoe", {"slots_fraction": 0.5, "expert_dtype": "int4"}, "graph"),
        ("swapmoe int3, slots of 50%, graph", "swapmoe", {"slots_fraction": 0.5, "expert_dtype": "int3"}, "graph"),
        ("swapmoe int2, slots of 50%, graph", "swapmoe", {"slots_fraction": 0.5, "expert_dtype": "int2"}, "graph"),
        ("swapmoe 50% int8, graph", "swapmoe", {"memory_budget": "50%", "expert_dtype": "int8"}, "graph"),
        ("swapmoe 25% int4, graph", "swapmoe", {"memory_budget": "25%", "expert_dtype": "int4"}, "graph"),
        # issue 14's baseline: every expert in the least lossy format that fits, all resident, no swapping
        ("quantized-all 25%, graph", "quantized-all", {"memory_budget": "25%"}, "graph"),
        ("quantized-all 50%, graph", "quantized-all", {"memory_budget": "50%"}, "graph"),
        # a mixed-precision plan's decode speed: the formats the planner chose for the reference model at
        # 50% (docs/quantization.md, "The planner's mixed plans": int8 x7, int4 x1 over its 8 layers, every
        # expert resident), each reference layer's format given to consecutive layers of this model
        ("swapmoe mixed int8/int4 (planned 50%), graph", "swapmoe", {"layer_formats": MIXED_50}, "graph"),
        ("ondemand 50%", "ondemand", {"memory_budget": "50%"}, "dynamic"),
        ("accelerate offload 50%", "accelerate-offload", {"memory_budget": "50%"}, "dynamic"),
    ]
    if not compile_step:
        return rows
    out = []
    for name, kind, kw, mode in rows:  # each compiled setting right after its uncompiled twin
        out.append((name, kind, kw, mode))
        if name in ("plain transformers, graph", "swapmoe 100%, graph", "swapmoe 50%, graph",
                    "swapmoe int8, slots of 50%, graph", "swapmoe int4, slots of 50%, graph"):
            out.append((name + "+compiled", kind, kw, "graph-compiled"))
    return out


def with_moe_kernels(chosen: list[tuple[str, str, dict[str, Any], str]], kernels: list[str]
                     ) -> list[tuple[str, str, dict[str, Any], str]]:
    """Each swapmoe setting once per ``moe_kernel`` choice (``--moe-kernel transformers,auto``: without and
    with the fused Triton kernel, in one process, named '<setting>, moe <choice>'); one choice keeps the names."""
    out = []
    for name, kind, kw, mode in chosen:
        if kind not in ("swapmoe", "quantized-all"):
            out.append((name, kind, kw, mode))
        elif len(kernels) == 1:  # one choice: the names stay as they are, the choice is passed all the same
            out.append((name, kind, {**kw, "moe_kernel": kernels[0]}, mode))
        else:
            out.extend((f"{name}, moe {k}", kind, {**kw, "moe_kernel": k}, mode) for k in kernels)
    return out


# Settings too slow for every round (accelerate moves offloaded weights in on every forward): measured
# once, over this many tokens.
SLOW_TOKENS = {"accelerate offload 50%": 4}


def spread(formats: tuple[str, ...], layers: int) -> list[str]:
    """Per-layer formats of a model with ``len(formats)`` layers given to one with ``layers``: layer ``l``
    takes the format of layer ``l * len(formats) // layers`` (consecutive layers share one)."""
    return [formats[i * len(formats) // layers] for i in range(layers)]


def experts_and_layers(path: Path) -> tuple[int, int]:
    """Experts per MoE layer and layers of the checkpoint's config (every layer is MoE in these shapes)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    return getattr(cfg, "num_experts", None) or cfg.num_local_experts, cfg.num_hidden_layers


def load(kind: str, path: Path, kw: dict[str, Any], device: torch.device, dtype: torch.dtype,
         cache: dict[tuple, Any]) -> Any:
    key = (kind, tuple(sorted(kw.items())))
    if key in cache:
        return cache[key]
    if kind == "plain":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    elif kind == "swapmoe":
        kw = dict(kw)  # the setting's own stays as it is (its cache key)
        if "slots_fraction" in kw:  # the same slots per layer as a bf16 budget of that fraction gives
            experts, layers = experts_and_layers(path)
            kw["slots"] = [round(kw.pop("slots_fraction") * experts)] * layers
        if "layer_formats" in kw:  # every expert resident, in the reference model's formats spread over the layers
            experts, layers = experts_and_layers(path)
            kw.update(slots=[experts] * layers, expert_dtype=spread(kw.pop("layer_formats"), layers))
        model = swapmoe.load(path, device=device, dtype=dtype, **kw)
    else:
        from swapmoe.baselines import load_policy

        extra = {k: v for k, v in kw.items() if k != "memory_budget"}  # moe_kernel (quantized-all)
        model = load_policy(kind, path, kw["memory_budget"], device=device, dtype=dtype, **extra)
    cache[key] = model
    return model


def load_seconds(model: Any) -> dict[str, float] | None:
    """Where a swapmoe load's time went (``VirtualExperts.load_seconds``); None for plain transformers."""
    runtime = getattr(model, "swapmoe", None)
    return dict(runtime.load_seconds) if runtime is not None else None


def profile_counts(dec: Decoder, prompt: list[int], feed: list[int], tokens: int) -> dict[str, float]:
    """GPU-busy ms, kernels and host syncs per token, from the profiler (noise does not move them)."""
    from torch.profiler import ProfilerActivity, profile

    # steady state: the graph captured and the prefill's owed updates done before profiling
    settle = 20
    dec.prefill(prompt, max_new_tokens=settle + tokens + 1)
    for i in range(settle):
        dec.read_logits(dec.step(feed[i]))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(tokens):
            dec.read_logits(dec.step(feed[settle + i]))
    kernels = busy = 0.0
    syncs = 0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
            busy += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        elif ev.name in SYNC_EVENTS:
            syncs += 1
    return {"gpu_busy_ms": busy / 1e3 / tokens, "kernels": kernels / tokens, "host_syncs": syncs / tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="olmoe-1b-7b", choices=sorted(ARCHS))
    p.add_argument("--layers", type=int, default=None, help="keep only this many layers (a shaped model)")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tokens", type=int, default=32, help="timed decode tokens per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile-tokens", type=int, default=8)
    p.add_argument("--settings", default=None,
                   help="';'-separated setting names to run (default: all). Not --only: inductor reads an --only "
                   "argument from sys.argv into the code it generates, unescaped (torch._inductor.utils.get_benchmark_name)")
    p.add_argument("--compile-step", action="store_true",
                   help="add settings whose captured decode step is compiled by inductor (graph+compiled)")
    p.add_argument("--compile-mode", default="default", choices=("default", "max-autotune-no-cudagraphs"),
                   help="inductor mode of the graph+compiled settings")
    p.add_argument("--moe-kernel", default=DEFAULT_MOE_KERNEL,
                   help="comma-separated swapmoe.load(moe_kernel=...) choices (transformers, auto, triton): every "
                        "swapmoe setting runs once per choice, named '<setting>, moe <choice>' (e.g. "
                        "transformers,auto: without and with the fused Triton kernel in one process)")
    p.add_argument("--checkpoint-layout", choices=("fused", "published"), default="fused",
                   help="how the random-weight checkpoint stores its experts: transformers' fused [E, ...] tensors "
                        "(the default: loads without transformers' per-load conversion) or per expert, as "
                        "published on the Hub (budgets.build_checkpoint); decode speed does not depend on it")
    p.add_argument("--out", type=Path, default=Path("runs/decode"))
    args = p.parse_args()
    console = Console()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    chosen = with_moe_kernels(settings(args.compile_step), [k.strip() for k in args.moe_kernel.split(",") if k.strip()])
    if args.settings:  # checked before minutes of building and loading: a typo would time nothing
        wanted = {s.strip() for s in args.settings.split(";") if s.strip()}
        known = {c[0] for c in chosen} | {c[0].rsplit(", moe ", 1)[0] for c in chosen}
        if wanted - known:
            p.error(f"unknown setting(s) {sorted(wanted - known)}; the settings here are: {'; '.join(sorted(known))}"
                    + ("" if args.compile_step else " (the graph+compiled ones need --compile-step)"))
        # a setting's own name also selects its per-kernel twins
        chosen = [c for c in chosen if c[0] in wanted or c[0].rsplit(", moe ", 1)[0] in wanted]
    if device.type != "cuda":  # accelerate's offloading moves weights from the GPU to host memory
        chosen = [c for c in chosen if c[1] != "accelerate-offload"]
    if args.layers:
        ARCHS[args.arch] = {**ARCHS[args.arch], "num_hidden_layers": args.layers}
    path = Path(args.model_dir or f"/tmp/swapmoe-bench-{args.arch}-{args.layers or 'all'}-{args.checkpoint_layout}")
    built = build_checkpoint(args.arch, path, dtype, device, console, layout=args.checkpoint_layout)
    bandwidth = copy_bandwidth(device)
    rng = torch.Generator().manual_seed(0)
    vocab = ARCHS[args.arch]["vocab_size"]
    prompt = torch.randint(0, vocab, (32,), generator=rng).tolist()
    feed = torch.randint(0, vocab, (max(args.tokens + 8, 20 + args.profile_tokens),), generator=rng).tolist()
    loaded: dict[tuple, Any] = {}
    decoders: dict[str, Decoder] = {}
    rows: dict[str, dict[str, Any]] = {}
    t_load = time.perf_counter()
    for name, kind, kw, mode in chosen:
        t_model, models_before = time.perf_counter(), len(loaded)
        model = load(kind, path, kw, device, dtype, loaded)
        fresh = len(loaded) > models_before  # not a model an earlier setting loaded
        # on a CPU (a smoke test) the graph settings run the graph path without the capture
        fuse, compiled = mode != "graph-unfused", mode == "graph-compiled"
        mode = "graph" if mode in ("graph-unfused", "graph-compiled") else mode
        t_compile = time.perf_counter()
        decoders[name] = Decoder(model, mode if device.type == "cuda" or mode != "graph" else "static",
                                 fuse_router=fuse and mode == "graph" and not compiled, compile_step=compiled,
                                 compile_mode=args.compile_mode)
        rows[name] = {"setting": name, "mode": mode + ("+compiled" if compiled else ""), "ms": []}
        if fresh:  # the GPU session's budget goes to loads first: say where
            rows[name]["load_s"] = time.perf_counter() - t_model
            rows[name]["load_phases_s"] = load_seconds(model)
        if compiled:  # compile (and capture) before the timed rounds, and say how long it took
            time_decode(model, prompt, 2, feed=feed, warmup=1, decoder=decoders[name])
            rows[name]["compile_s"] = time.perf_counter() - t_compile
            rows[name]["compile_mode"] = args.compile_mode
    console.print(f"built {built:.0f}s, loaded {len(loaded)} models in {time.perf_counter() - t_load:.0f}s")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"decode-{args.arch}{'-' + str(args.layers) + 'l' if args.layers else ''}.json"
    common = {"arch": args.arch, "layers": args.layers, "checkpoint_layout": args.checkpoint_layout,
              "spec": ARCHS[args.arch], "tokens": args.tokens,
              "rounds": args.rounds, "bandwidth_bytes_per_s": bandwidth, **provenance(device)}

    def write(result: dict[str, Any]) -> None:
        out.write_text(json.dumps(result, indent=1))
    for r in range(args.rounds):
        order = list(rows) if r % 2 == 0 else list(reversed(rows))
        for name in order:
            if name in SLOW_TOKENS and r > 0:
                continue
            dec = decoders[name]
            runtime = getattr(dec.model, "swapmoe", None)
            before = runtime.stats()["total"] if runtime is not None else None
            timing = time_decode(dec.model, prompt, SLOW_TOKENS.get(name, args.tokens), feed=feed, warmup=2,
                                 decoder=dec)
            rows[name]["ms"].append(1e3 * statistics.median(timing.step_s))
            if runtime is not None and (r == args.rounds - 1 or name in SLOW_TOKENS):
                after = runtime.stats()["total"]
                looked = after["lookups"] - before["lookups"]
                rows[name]["hit_rate"] = (after["hits"] - before["hits"]) / looked if looked else None
                rows[name]["swaps"] = after["swaps"] - before["swaps"]
        console.print(f"round {r + 1}/{args.rounds} done: " + "; ".join(
            f"{name} {statistics.median(row['ms']):.2f}" for name, row in rows.items() if row["ms"]))
        # a run cut short (the GPU machine's per-call limit) still leaves the rounds it finished
        write({**common, "complete": False, "rounds_done": r + 1, "rows": [summarised(row) for row in rows.values()]})
    for name, dec in decoders.items():
        row = summarised(rows[name])
        rows[name] = row
        model = dec.model
        if hasattr(model, "swapmoe"):
            experts, other = weight_split(model)
            row.update(expert_bytes=experts, other_bytes=other)
            read = bytes_per_token(model, other)
            row["roofline_ms"] = 1e3 * read / bandwidth if bandwidth == bandwidth else None
            row["roofline_share"] = row["roofline_ms"] / row["ms_median"] if row["roofline_ms"] else None
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            if "ondemand" not in name and name not in SLOW_TOKENS:
                row.update(profile_counts(dec, prompt, feed, args.profile_tokens))
            row["decode_transient_bytes"] = torch.cuda.max_memory_allocated(device) - base
            row["graphs_captured"] = dec.graphs_captured
        if dec.compiled is not None:
            row["compiles"] = dec.compiled.compiles  # over the whole run: a per-token recompile would show
    gc.collect()
    show(list(rows.values()), console)
    write({**common, "complete": True, "rounds_done": args.rounds, "rows": list(rows.values())})
    console.print(f"wrote {out}")


def summarised(row: dict[str, Any]) -> dict[str, Any]:
    """A row with min/median ms and tokens/s over the rounds it has (None before the first)."""
    if not row["ms"]:
        return {**row, "ms_min": None, "ms_median": None, "tokens_per_s": None}
    median = statistics.median(row["ms"])
    return {**row, "ms_min": min(row["ms"]), "ms_median": median, "tokens_per_s": 1e3 / median}


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table docs/benchmarks.md quotes (tests/test_docs_figures.py regenerates it from the JSON)."""
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["| setting | ms/token min | median | tokens/s | roofline share | GPU busy ms/token | kernels/token "
             "| host syncs/token | hit rate | swaps (last round) |", "|" + "---|" * 10]
    for r in rows:
        cells = [r["setting"], f(r.get("ms_min"), ".2f"), f(r.get("ms_median"), ".2f"), f(r.get("tokens_per_s"), ".0f"),
                 f(r.get("roofline_share"), ".0%"), f(r.get("gpu_busy_ms"), ".2f"), f(r.get("kernels"), ".0f"),
                 f(r.get("host_syncs"), ".2f"), f(r.get("hit_rate"), ".3f"), f(r.get("swaps"), "d")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def show(rows: list[dict[str, Any]], console: Console) -> None:
    t = Table(title="batch-1 decode")
    for col in ("setting", "ms/token min", "median", "tok/s", "roofline", "GPU busy ms", "kernels", "syncs",
                "hit rate", "swaps"):
        t.add_column(col)

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in rows:
        t.add_row(r["setting"], f(r["ms_min"], ".2f"), f(r["ms_median"], ".2f"), f(r["tokens_per_s"], ".0f"),
                  f(r.get("roofline_share"), ".0%"), f(r.get("gpu_busy_ms"), ".2f"), f(r.get("kernels"), ".0f"),
                  f(r.get("host_syncs"), ".1f"), f(r.get("hit_rate"), ".2f"), f(r.get("swaps"), "d"))
    console.print(t)


if __name__ == "__main__":
    main()
