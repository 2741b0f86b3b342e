"""The fused Triton MoE decode kernel against transformers' grouped_mm path, per MoE layer.

For each expert shape (published dims, random weights, ``--slots`` of the experts as slot tensors, as a
swapmoe layer holds them) and each token count:

* correctness: the fused kernel and grouped_mm in the model dtype against a float64 reference computed
  on the device (swapmoe.kernels.reference), with skipped terms (ids >= S) in the call, and the kernel's
  captured-graph output against its eager output (bit for bit); int8, int4, int3 and int2
  (swapmoe.quant, dequantised inside the kernel) against the reference on the dequantised weights;
* speed: per-layer time inside one CUDA graph of ``--layers`` layers (each its own weights, so the
  weights come from HBM as in a model), the bytes of the chosen experts over that time (GB/s), and
  from the profiler over eager calls: kernels per layer call and GPU-busy time per layer call;
  int8, int4, int3 and int2 fused against swapmoe's per-term gather path (qexperts.QuantisedForward +
  grouped_mm);
* a small sweep of the fused kernel's tile sizes at T=1 (the best is reported; the default is
  swapmoe.kernels.fused_moe.default_blocks).

A table on stdout and a JSON with provenance (torch, transformers, triton, GPU, commit) under --out.
Run on the H200 with bf16 and int8 (docs/results/fused_moe/fused_moe.json) and with int4
(fused_moe-int4.json); the int3 and int2 columns are smoke-tested on CPU under Triton's interpreter only.

    python benchmarks/fused_moe.py --out runs/fused_moe                              # on the GPU machine
    python benchmarks/fused_moe.py --device cpu --shapes tiny,tiny-gpt-oss --layers 2 --out runs/fm-smoke  # interpreter

    T = tokens, K = experts per token, S = slots, H = hidden size, I = intermediate size, L = layers
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPES: dict[str, dict[str, Any]] = {
    "olmoe-1b-7b": dict(model_type="olmoe", hidden=2048, inter=1024, experts=64, top_k=8),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden=2048, inter=768, experts=128, top_k=8),
    "gpt-oss-20b": dict(model_type="gpt_oss", hidden=2880, inter=2880, experts=32, top_k=4),
    "tiny": dict(model_type="olmoe", hidden=64, inter=32, experts=8, top_k=2),  # CPU smoke tests
    "tiny-gpt-oss": dict(model_type="gpt_oss", hidden=64, inter=32, experts=8, top_k=2),
}
# Tile sweep, each kernel on its own (their tiles are independent): (rows per program, columns per
# loop step, warps)
#: the swapmoe.quant formats measured in the kernel and the gather path (each has a --no-<fmt> switch)
QUANT_FORMATS = ("int8", "int4", "int3", "int2")
SWEEP_GATE_UP = [(n, k, w) for n in (8, 16, 32) for k in (128, 256, 512) for w in (4, 8)]
SWEEP_DOWN = [(n, k, w) for n in (4, 8, 16) for k in (256, 512, 1024) for w in (4, 8)]


def experts_module(shape: dict[str, Any], slots: int, dtype: torch.dtype, device: torch.device,
                   seed: int | None) -> torch.nn.Module:
    """A transformers experts module of ``shape`` holding ``slots`` random experts, as swapmoe sets a
    virtualised layer up (``num_experts = S``, ids >= S skipped). The weights are drawn on ``device``
    (gigabytes per shape: the host would take minutes); ``seed`` None: parameters left on the meta device."""
    from transformers import AutoConfig

    kw: dict[str, Any] = {"hidden_size": shape["hidden"], "num_experts_per_tok": shape["top_k"],
                          "experts_implementation": "grouped_mm"}
    mt = shape["model_type"]
    if mt == "olmoe":
        from transformers.models.olmoe.modeling_olmoe import OlmoeExperts as cls
        kw.update(intermediate_size=shape["inter"], num_experts=slots)
    elif mt == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls
        kw.update(moe_intermediate_size=shape["inter"], num_experts=slots)
    else:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls
        kw.update(intermediate_size=shape["inter"], num_local_experts=slots)
    config = AutoConfig.for_model(mt, **kw)
    config._experts_implementation = "grouped_mm"
    with torch.device("meta" if seed is None else device):
        m = cls(config).to(dtype).eval()
    m._is_expert_parallel = True  # transformers' kernels skip ids >= num_experts only in this mode
    if seed is None:
        return m
    gen = torch.Generator(device=device).manual_seed(seed)
    transposed = getattr(m, "is_transposed", False)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 3:  # [S, out, in] (transposed: [S, in, out]): unit-variance outputs
                fan_in = p.shape[1] if transposed else p.shape[2]
                p.copy_(torch.randn(p.shape, generator=gen, device=device) / fan_in**0.5)
            else:  # biases
                p.copy_(torch.randn(p.shape, generator=gen, device=device) * 0.1)
    return m


def routing(T: int, K: int, S: int, skipped: int, seed: int, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot ids ``[T, K]`` (distinct per token; the last ``skipped`` of each token set to S) and weights."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(S, generator=gen)[:K] for _ in range(T)])  # [T, K]
    if skipped:
        ids[:, K - skipped:] = S
    w = torch.rand(T, K, generator=gen).softmax(-1)
    return ids.to(device), w.to(device)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def graph_time(fn: Any, device: torch.device, iters: int) -> float | None:
    """Seconds of one call of ``fn`` (which runs all layers) replayed from a CUDA graph; None off CUDA."""
    if device.type != "cuda":
        return None
    fn()  # warm-up / compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(times)


def per_layer_us(fn: Any, device: torch.device, args: argparse.Namespace, row: dict[str, Any], key: str) -> None:
    """``row[key]``: microseconds per layer of ``fn`` (all layers) replayed from a graph; a capture that
    fails is recorded under ``key + "_error"`` instead of ending the run."""
    try:
        t = graph_time(fn, device, args.iters)
    except Exception as e:
        row[key], row[f"{key}_error"] = None, str(e).splitlines()[0][:300]
        return
    row[key] = None if t is None else 1e6 * t / args.layers


def eager_time(fn: Any, device: torch.device, iters: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def profile_call(fn: Any, device: torch.device, calls: int) -> dict[str, float]:
    """Kernels and GPU-busy microseconds per call of ``fn`` (one layer), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    kernels = busy = 0.0
    names: dict[str, int] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
            busy += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            names[ev.name[:60]] = names.get(ev.name[:60], 0) + 1
    return {"kernels": kernels / calls, "gpu_busy_us": busy / calls,
            "kernel_names": {k: v / calls for k, v in sorted(names.items(), key=lambda kv: -kv[1])[:20]}}


def expert_bytes(m: torch.nn.Module) -> int:
    return sum(p[0].numel() * p.element_size() for p in m.parameters())


def run_shape(name: str, shape: dict[str, Any], args: argparse.Namespace, device: torch.device,
              dtype: torch.dtype, console: Console) -> list[dict[str, Any]]:
    from swapmoe.fused import expert_tensors, gate_spec

    S = max(shape["top_k"], round(shape["experts"] * args.slots))
    layers = [experts_module(shape, S, dtype, device, seed=i) for i in range(args.layers)]
    spec = gate_spec(layers[0])
    assert spec is not None, f"{name}: the fused kernel does not know this activation"
    tensors = [expert_tensors(m, spec) for m in layers]
    rows = []
    for T in args.tokens:
        with torch.no_grad():
            row = run_case(name, shape, T, S, layers, tensors, spec, args, device, dtype)
            for fmt in QUANT_FORMATS:
                if shape["model_type"] != "gpt_oss" and getattr(args, fmt):
                    row.update(run_quantised(fmt, shape, T, S, layers, spec, args, device, dtype))
        rows.append(row)
        console.print(f"{name} T={T} done")
    return rows


def run_case(name: str, shape: dict[str, Any], T: int, S: int, layers: list[torch.nn.Module], tensors: list[Any],
             spec: Any, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Correctness, per-layer graph time, kernels and busy time of the fused kernel and grouped_mm."""
    from swapmoe.kernels import fused_moe as fm
    from swapmoe.kernels.reference import reference_experts

    K, H = shape["top_k"], shape["hidden"]
    row: dict[str, Any] = {"shape": name, "T": T, "K": K, "S": S, "H": H, "I": shape["inter"],
                           "dtype": str(dtype).removeprefix("torch."), "layers": args.layers}
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(7)).to(device, dtype)  # [T, H]
    ids, w = routing(T, K, S, 0, seed=11, device=device)
    ids_skip, _ = routing(T, K, S, max(1, K // 4), seed=11, device=device)

    def fused(ids: torch.Tensor = ids, i: int = 0, blocks: Any = None) -> torch.Tensor:
        return fm.fused_experts(x, ids, w, tensors[i], spec.act, spec.alpha, spec.limit, blocks=blocks)

    def grouped(ids: torch.Tensor = ids, i: int = 0) -> torch.Tensor:
        return type(layers[i]).forward(layers[i], x, ids, w)

    def all_layers(fn: Any) -> Any:
        return lambda: [fn(i=i) for i in range(args.layers)]

    for tag, the_ids in (("", ids), ("_skip", ids_skip)):
        ref = reference_experts(x, the_ids, w, tensors[0], spec.act, spec.alpha, spec.limit)  # float64
        row[f"err_fused{tag}"] = rel_err(fused(the_ids), ref)
        row[f"err_grouped_mm{tag}"] = rel_err(grouped(the_ids), ref)
    row["fused_vs_grouped_mm"] = rel_err(fused(), grouped().double())
    if device.type == "cuda":  # the captured kernel gives the eager result, bit for bit
        eager = fused().clone()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fused()
        g.replay()
        torch.cuda.synchronize()
        row["graph_equals_eager"] = bool(torch.equal(out, eager))
    for tag, fn in (("fused", fused), ("grouped_mm", grouped)):
        per_layer_us(all_layers(fn), device, args, row, f"{tag}_graph_us")
        row[f"{tag}_eager_us"] = 1e6 * eager_time(fn, device, args.iters)
        prof = profile_call(fn, device, 10)
        row[f"{tag}_kernels"] = prof["kernels"]
        row[f"{tag}_busy_us"] = prof["gpu_busy_us"]
        row[f"{tag}_kernel_names"] = prof["kernel_names"]
    read = len(set(ids.flatten().tolist())) * expert_bytes(layers[0])  # the chosen experts' bytes
    row["bytes_per_layer"] = read
    for tag in ("fused", "grouped_mm"):
        us = row[f"{tag}_graph_us"]
        row[f"{tag}_gb_s"] = read / us / 1e3 if us else None
    if T == 1 and device.type == "cuda" and args.sweep and shape["model_type"] != "gpt_oss":
        row.update(sweep_tiles(x, ids, w, tensors, spec, args, device))
    return row


def sweep_tiles(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, tensors: list[Any], spec: Any,
                args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Per-layer graph time of each kernel alone over :data:`SWEEP_GATE_UP` / :data:`SWEEP_DOWN`."""
    from swapmoe.kernels import fused_moe as fm

    h = fm.gate_up_act(x, ids, tensors[0], spec.act, spec.alpha, spec.limit)  # [J, I], input of the down kernel
    out: dict[str, Any] = {}
    for kernel, configs in (("gate_up", SWEEP_GATE_UP), ("down", SWEEP_DOWN)):
        results = []
        for n, k, warps in configs:
            if kernel == "gate_up":
                b = fm.Blocks(gate_up_n=n, gate_up_k=k, gate_up_warps=warps)

                def one(i: int, b: Any = b) -> Any:
                    return fm.gate_up_act(x, ids, tensors[i], spec.act, spec.alpha, spec.limit, b)
            else:
                b = fm.Blocks(down_n=n, down_k=k, down_warps=warps)

                def one(i: int, b: Any = b) -> Any:
                    return fm.down_sum(h, ids, w, tensors[i], x.dtype, b)
            try:
                t = graph_time(lambda one=one: [one(i) for i in range(args.layers)], device, args.iters)
            except Exception as e:  # a tile the compiler rejects (registers, shared memory)
                results.append({"tiles": (n, k, warps), "error": str(e).splitlines()[0][:200]})
                continue
            results.append({"tiles": (n, k, warps), "graph_us": 1e6 * t / args.layers})
        out[f"sweep_{kernel}"] = results
        ok = [r for r in results if "graph_us" in r]
        if ok:
            best = min(ok, key=lambda r: r["graph_us"])
            out[f"best_{kernel}_tiles"], out[f"best_{kernel}_us"] = best["tiles"], best["graph_us"]
    return out


def run_quantised(fmt: str, shape: dict[str, Any], T: int, S: int, layers: list[torch.nn.Module], spec: Any,
                  args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Slots in ``fmt`` (int8, int4, int3 or int2): the fused kernel (dequantising in its loads) against swapmoe's
    per-term gather path (qexperts.QuantisedForward + grouped_mm), both captured in a graph of all
    layers; keys ``{fmt}_...``."""
    from swapmoe.fused import expert_tensors, install
    from swapmoe.kernels import fused_moe as fm
    from swapmoe.kernels.reference import reference_experts
    from swapmoe.qexperts import install as install_quantised
    from swapmoe.quant import ExpertLayout

    K, H = shape["top_k"], shape["hidden"]
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(7)).to(device, dtype)  # [T, H]
    ids, w = routing(T, K, S, 0, seed=11, device=device)
    ids_skip, _ = routing(T, K, S, max(1, K // 4), seed=11, device=device)
    quantised = []
    for m in layers:
        q = experts_module(shape, S, dtype, device, seed=None)  # its parameters: placeholders below
        params = {"gate_up_proj": m.gate_up_proj.detach(), "down_proj": m.down_proj.detach()}
        layout = ExpertLayout.of(params, fmt)
        for n in params:  # the slots hold the parts; the parameters become empty placeholders
            q._parameters[n] = torch.nn.Parameter(torch.empty(0, device=device, dtype=dtype), requires_grad=False)
        quantised.append((q, install_quantised(q, layout, layout.encode(params))))
    q0, qf0 = quantised[0]
    ex0 = expert_tensors(q0, spec, qf0)
    ref = reference_experts(x, ids_skip, w, ex0, spec.act)
    row: dict[str, Any] = {f"{fmt}_err_fused_skip": rel_err(fm.fused_experts(x, ids_skip, w, ex0), ref),
                           f"{fmt}_err_gather_skip": rel_err(qf0(x, ids_skip, w), ref)}
    per_layer_us(lambda: [qf(x, ids, w) for _, qf in quantised], device, args, row, f"{fmt}_gather_graph_us")
    for q, _ in quantised:
        install(q, devices=(device.type,))  # FusedForward over the QuantisedForward
    per_layer_us(lambda: [q(x, ids, w) for q, _ in quantised], device, args, row, f"{fmt}_fused_graph_us")
    read = len(set(ids.flatten().tolist())) * sum(t[0].numel() * t.element_size() for t in qf0.parts.values())
    row[f"{fmt}_bytes_per_layer"] = read
    us = row[f"{fmt}_fused_graph_us"]
    row[f"{fmt}_fused_gb_s"] = read / us / 1e3 if us else None
    return row


def show(rows: list[dict[str, Any]], console: Console) -> None:
    t = Table(title="fused MoE kernel vs transformers grouped_mm, per MoE layer")
    cols = [("shape", "shape", "s"), ("T", "T", "d"), ("S", "S", "d"),
            ("err fused", "err_fused_skip", ".1e"), ("err gmm", "err_grouped_mm_skip", ".1e"),
            ("graph us fused", "fused_graph_us", ".1f"), ("graph us gmm", "grouped_mm_graph_us", ".1f"),
            ("GB/s fused", "fused_gb_s", ".0f"), ("kernels fused", "fused_kernels", ".0f"),
            ("kernels gmm", "grouped_mm_kernels", ".0f"), ("busy us fused", "fused_busy_us", ".1f"),
            ("busy us gmm", "grouped_mm_busy_us", ".1f"), ("best gate_up us", "best_gate_up_us", ".1f"),
            ("best down us", "best_down_us", ".1f"),
            ("int8 fused us", "int8_fused_graph_us", ".1f"), ("int8 gather us", "int8_gather_graph_us", ".1f"),
            *[c for fmt in ("int4", "int3", "int2") for c in
              ((f"{fmt} err fused", f"{fmt}_err_fused_skip", ".1e"),
               (f"{fmt} fused us", f"{fmt}_fused_graph_us", ".1f"),
               (f"{fmt} gather us", f"{fmt}_gather_graph_us", ".1f"))]]
    for head, _, _ in cols:
        t.add_column(head)
    for r in rows:
        t.add_row(*["-" if r.get(k) is None else format(r[k], f) for _, k, f in cols])
    console.print(t)


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(result: dict[str, Any]) -> str:
    """The docs' table (docs/benchmarks.md) from a result file: one row per shape and token count, with
    the columns of each quantised format the run measured (``--no-<fmt>`` leaves a format out)."""
    fmts = [f for f in QUANT_FORMATS if any(f"{f}_fused_graph_us" in r for r in result["rows"])]
    heads = ["shape", "T", "slots", "rel. error fused", "rel. error grouped_mm", "us/layer fused",
             "us/layer grouped_mm", "GB/s fused", "kernels/layer fused", "kernels/layer grouped_mm",
             *[h for f in fmts for h in (f"rel. error {f} fused", f"us/layer {f} fused", f"us/layer {f} gather")]]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in result["rows"]:
        cells = [r["shape"], str(r["T"]), str(r["S"]), _f(r["err_fused_skip"], ".1e"),
                 _f(r["err_grouped_mm_skip"], ".1e"), _f(r.get("fused_graph_us"), ".1f"),
                 _f(r.get("grouped_mm_graph_us"), ".1f"), _f(r.get("fused_gb_s"), ".0f"),
                 _f(r["fused_kernels"], ".0f"), _f(r["grouped_mm_kernels"], ".0f"),
                 *[_f(r.get(f"{f}_{k}"), spec) for f in fmts
                   for k, spec in (("err_fused_skip", ".1e"), ("fused_graph_us", ".1f"), ("gather_graph_us", ".1f"))]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="olmoe-1b-7b,qwen3-30b-a3b,gpt-oss-20b",
                   help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--slots", type=float, default=0.5, help="slots per layer as a share of the experts")
    p.add_argument("--tokens", default="1,4", help="comma-separated tokens per call (T*K <= 64: decode)")
    p.add_argument("--layers", type=int, default=16, help="layers per captured graph (each its own weights)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the tile-size sweep")
    for fmt in QUANT_FORMATS:
        p.add_argument(f"--no-{fmt}", dest=fmt, action="store_false", help=f"skip the {fmt} columns")
    p.add_argument("--out", type=Path, default=Path("runs/fused_moe"))
    args = p.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    device = torch.device(args.device)
    if device.type == "cpu":  # no GPU: Triton's interpreter runs the kernels (set before they are defined)
        os.environ["TRITON_INTERPRET"] = "1"
        args.iters = min(args.iters, 2)
    dtype = getattr(torch, args.dtype)
    console = Console(width=240)
    from swapmoe.fused import triton_available
    from swapmoe.provenance import provenance

    if not triton_available():
        raise SystemExit("Triton does not import here: nothing to benchmark")
    import triton

    rows: list[dict[str, Any]] = []
    for name in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        rows += run_shape(name, SHAPES[name], args, device, dtype, console)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    show(rows, console)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
              "shapes": {n: SHAPES[n] for n in args.shapes.split(",")}, "triton": triton.__version__,
              **provenance(device), "rows": rows}
    out = args.out / "fused_moe.json"
    out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
