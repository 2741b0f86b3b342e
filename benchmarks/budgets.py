"""Memory and decode speed of swapmoe at several budgets, with and without copy/compute overlap.

Builds a model of a published MoE architecture with random weights, saves it as a Hugging Face
checkpoint (``save_pretrained``: legacy per-expert names, sharded), loads it back through
``swapmoe.load`` at each budget and measures, for a batch-1 greedy decode:

* peak device memory, split into expert slots (the budget), other weights (always resident) and
  the rest (KV cache, activations, workspace), plus the peak while loading;
* decode tokens/s, with asynchronous copies (side stream, pinned memory) and with synchronous ones;
* swaps, bytes copied and hit rate over the measured decode;
* the roofline: bytes of weights read per token over the measured device copy bandwidth.

Random weights route almost uniformly, with no temporal locality: hit rates here are a floor, not
what a trained model sees (the reference model's figures are in docs/). The point of this run is
memory and speed.

    python benchmarks/budgets.py --arch olmoe-1b-7b --out runs/budgets       # on the GPU machine
    python benchmarks/budgets.py --arch tiny --device cpu --out runs/tiny     # smoke test anywhere
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
from swapmoe.budget import format_bytes
from swapmoe.compat import cache_kwargs
from swapmoe.provenance import provenance

# Published dimensions (DESIGN.md); "tiny" keeps the same shape at toy size for CPU smoke tests.
ARCHS: dict[str, dict[str, Any]] = {
    "olmoe-1b-7b": dict(model_type="olmoe", hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                        num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                        num_experts_per_tok=8, vocab_size=50304, max_position_embeddings=4096),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, moe_intermediate_size=768,
                          intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          vocab_size=151936, max_position_embeddings=4096),
    "tiny": dict(model_type="olmoe", hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=4,
                 vocab_size=256, max_position_embeddings=512),
}


def build_checkpoint(arch: str, path: Path, dtype: torch.dtype, device: torch.device, console: Console,
                     layout: str = "published") -> float:
    """Random weights of ``arch`` saved at ``path`` (skipped when already there); returns seconds.

    ``layout``: "published" saves with ``save_pretrained`` (per-expert tensor names, as the Hub's MoE
    checkpoints are: transformers fuses them at every load, seconds per layer on a CPU); "fused" saves
    transformers' own fused ``[E, ...]`` expert tensors, which load without that conversion (what a
    decode benchmark wants: its loads, not its checkpoint's layout, eat a GPU session's minutes).
    """
    if layout not in ("published", "fused"):
        raise ValueError(f"layout must be 'published' or 'fused', got {layout!r}")
    from transformers import AutoConfig, AutoModelForCausalLM

    if (path / "config.json").is_file():
        console.print(f"reusing {path}")
        return 0.0
    t0 = time.perf_counter()
    spec = dict(ARCHS[arch])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: minutes faster than on the host
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if layout == "published":
        model.save_pretrained(path, max_shard_size="4GB")
    else:
        from huggingface_hub import save_torch_state_dict

        model.config.save_pretrained(path)
        save_torch_state_dict(model.state_dict(), path, max_shard_size="4GB")  # shards + index, safetensors
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def copy_bandwidth(device: torch.device) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted once each)."""
    if device.type != "cuda":
        return float("nan")
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    reps = 20
    for _ in range(reps):
        b.copy_(a)
    end.record()
    end.synchronize()
    secs = start.elapsed_time(end) / 1e3
    del a, b
    return 2 * n * reps / secs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode(model: Any, prompt: torch.Tensor, new_tokens: int, feed: torch.Tensor | None = None
           ) -> tuple[float, float]:
    """Batch-1 decode; returns (prefill seconds, decode seconds for ``new_tokens - 1`` steps).

    Greedy unless ``feed`` (``[1, new_tokens]`` token ids) is given: then step ``i`` is fed
    ``feed[:, i]`` instead of the argmax. A random-weight model decoding greedily soon repeats one
    token, which routes identically every step and flatters the hit rate; fed tokens keep routing
    as varied as the token stream. The work per step is the same either way.
    """
    from transformers import DynamicCache

    dev = prompt.device
    cache = DynamicCache(config=model.config)
    sync(dev)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, **cache_kwargs(model, cache), use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    sync(dev)
    t1 = time.perf_counter()
    for i in range(new_tokens - 1):
        out = model(input_ids=tok if feed is None else feed[:, i : i + 1], **cache_kwargs(model, cache), use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    sync(dev)
    return t1 - t0, time.perf_counter() - t1


def weight_split(model: Any) -> tuple[int, int]:
    """(expert slot bytes, other weight bytes) on the device, summed from the tensors."""
    slot_ids = {id(t) for st in model.swapmoe.layers if st.pool is not None for t in st.pool.slots.values()}
    slot_ptrs = {t.data_ptr() for st in model.swapmoe.layers if st.pool is not None for t in st.pool.slots.values()}
    experts = sum(st.resident_bytes() for st in model.swapmoe.layers)
    full_layer_params = {id(getattr(st.layer.experts, n)) for st in model.swapmoe.layers if st.pool is None
                         for n in st.layer.expert_param_names}
    other = 0
    seen: set[int] = set()
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) in seen or id(p) in slot_ids or id(p) in full_layer_params or p.data_ptr() in slot_ptrs:
            continue
        seen.add(id(p))
        other += p.numel() * p.element_size()
    return experts, other


def bytes_per_token(model: Any, other_bytes: int) -> int:
    """Weight bytes a decode step reads: all non-expert weights but the embedding table, plus the
    top-k experts of every MoE layer (the input embedding reads one row)."""
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb
    read = other_bytes - (0 if tied else emb.numel() * emb.element_size())
    for st in model.swapmoe.layers:  # a pooled layer's store holds the format its slots hold (quantised or not)
        # a whole layer: its stored bytes per expert (a quantised one's parameters are empty placeholders)
        per_expert = st.pool.store.expert_bytes() if st.pool is not None else st.full_bytes // st.layer.num_experts
        read += st.layer.top_k * per_expert
    return read


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    console = Console()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    path = Path(args.model_dir or f"/tmp/swapmoe-bench-{args.arch}")
    built = build_checkpoint(args.arch, path, dtype, device, console)
    console.print(f"checkpoint {path} ({format_bytes(sum(f.stat().st_size for f in path.glob('*.safetensors')))}), "
                  f"built in {built:.1f}s")
    bw = copy_bandwidth(device)
    rows: list[dict[str, Any]] = []
    schedules = [parse_schedule(sch) for sch in args.schedules.split(",")]
    budgets = args.budgets.split(",")
    # a throwaway row first: the process's first model pays one-off CUDA and kernel set-up costs
    measure(args, path, budgets[0], *schedules[0], "sync", device, dtype, bw)
    for budget in budgets:
        for interval, swaps, decay in schedules if budget != "100%" else schedules[:1]:
            for mode in ("async", "sync"):
                rows.append(measure(args, path, budget, interval, swaps, decay, mode, device, dtype, bw))
                console.print({k: rows[-1][k] for k in ("budget", "schedule", "copies", "decode_tokens_per_s",
                                                         "swaps", "hit_rate")})
    show(rows, console)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"budgets-{args.arch}.json").write_text(json.dumps(rows, indent=2) + "\n")
        (out / f"budgets-{args.arch}.md").write_text(markdown(rows))
    return rows


def parse_schedule(text: str) -> tuple[int, int, float]:
    """``"16x1"`` or ``"1x8@0.5"``: update_interval x swaps_per_update [@ decay]."""
    head, _, decay = text.partition("@")
    interval, swaps = (int(x) for x in head.split("x"))
    return interval, swaps, float(decay) if decay else 0.98


def measure(args: argparse.Namespace, path: Path, budget: str, interval: int, swaps: int, decay: float, mode: str,
            device: torch.device, dtype: torch.dtype, bw: float) -> dict[str, Any]:
    """One fresh load and one measured decode: every row starts from the same initial resident set."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model = swapmoe.load(path, budget, device=device, dtype=dtype, update_interval=interval,
                         swaps_per_update=swaps, decay=decay, async_swaps=mode == "async")
    load_s = time.perf_counter() - t0
    load_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    experts, other = weight_split(model)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)  # the same prompt and stream for every row
    prompt = torch.randint(0, vocab, (1, args.prompt_tokens), generator=gen).to(device)
    feed = torch.randint(0, vocab, (1, args.new_tokens), generator=gen).to(device) if args.feed == "random" else None
    decode(model, prompt, 16, feed)  # warm-up: kernels for these shapes, allocator, first swaps
    model.swapmoe.synchronize()
    model.swapmoe.reset_stats()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill_s, decode_s = decode(model, prompt, args.new_tokens, feed)
    model.swapmoe.synchronize()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    st = model.swapmoe.stats()["total"]
    read = bytes_per_token(model, other)
    row = {
        "arch": args.arch, "budget": budget, "schedule": f"{interval}x{swaps}@{decay:g}", "decay": decay, "update_interval": interval,
        "swaps_per_update": swaps, "copies": mode, "feed": args.feed, "slots": st["slots"],
        "budget_bytes": st["budget_bytes"], "expert_slot_bytes": experts, "other_weight_bytes": other,
        "peak_bytes": peak, "rest_bytes": peak - experts - other if peak else 0,
        "load_peak_bytes": load_peak, "load_seconds": load_s,
        "prefill_tokens": args.prompt_tokens, "prefill_seconds": prefill_s,
        "decode_tokens": args.new_tokens - 1, "decode_tokens_per_s": (args.new_tokens - 1) / decode_s,
        "swaps": st["swaps"], "bytes_copied": st["bytes_copied"], "hit_rate": st["hit_rate"],
        "weight_bytes_per_token": read, "copy_bandwidth": bw,
        "roofline_tokens_per_s": bw / read if bw == bw else float("nan"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "provenance": provenance(device),
    }
    del model
    return row


def show(rows: list[dict[str, Any]], console: Console) -> None:
    t = Table(title=f"swapmoe budgets: {rows[0]['arch']} on {rows[0]['device']}")
    cols = ("budget", "schedule", "copies", "expert slots", "other weights", "rest", "peak", "load peak", "decode tok/s",
            "roofline tok/s", "swaps", "copied", "hit rate")
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*cells(r))
    console.print(t)


def cells(r: dict[str, Any]) -> list[str]:
    return [r["budget"], r["schedule"], r["copies"], format_bytes(r["expert_slot_bytes"]), format_bytes(r["other_weight_bytes"]),
            format_bytes(r["rest_bytes"]), format_bytes(r["peak_bytes"]), format_bytes(r["load_peak_bytes"]),
            f"{r['decode_tokens_per_s']:.1f}", f"{r['roofline_tokens_per_s']:.0f}", str(r["swaps"]),
            format_bytes(r["bytes_copied"]), "-" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"]


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ["budget", "interval x swaps @ decay", "copies", "expert slots", "other weights", "rest (KV, activations)", "peak", "load peak",
            "decode tok/s", "roofline tok/s", "swaps", "bytes copied", "hit rate"]
    lines = [f"{rows[0]['arch']} on {rows[0]['device']}, torch {rows[0]['torch']}; "
             f"device copy bandwidth {rows[0]['copy_bandwidth'] / 1e9:.0f} GB/s; decode fed {rows[0]['feed']} "
             f"tokens, {rows[0]['decode_tokens']} steps after a {rows[0]['prefill_tokens']}-token prompt", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="olmoe-1b-7b")
    p.add_argument("--model-dir", default=None, help="where the random checkpoint is saved (reused if present)")
    p.add_argument("--budgets", default="25%,50%,100%")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--schedules", default="16x1,1x4,1x8@0.5",
                   help="update_interval x swaps_per_update [@decay]; the last, copy-heavy one shows the overlap")
    p.add_argument("--feed", choices=["random", "greedy"], default="random",
                   help="tokens fed while decoding (random: varied routing, as a real stream)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="folder for the JSON and Markdown tables")
    p.add_argument("--build-only", action="store_true", help="only write the random checkpoint (for other runs)")
    args = p.parse_args()
    if args.build_only:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        build_checkpoint(args.arch, Path(args.model_dir or f"/tmp/swapmoe-bench-{args.arch}"), getattr(torch, args.dtype),
                         device, Console())
        return
    run(args)


if __name__ == "__main__":
    main()
