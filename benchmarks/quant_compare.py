"""Weight quantisers compared on the reference model's experts: accuracy and CPU speed.

For each quantiser (swapmoe's own group-wise functions, HQQ, torchao's affine primitives, optimum-quanto)
and format (int8, int4; groups of 64 along the last dim where the library has groups), every expert
weight of the model (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]`` of each MoE layer, passed
as one ``[E*rows, cols]`` matrix) is quantised and dequantised, and we report

* the relative error ``||W' - W|| / ||W||`` over all expert weights;
* the perplexity of the held-out text with the dequantised weights in place (fake quantisation: the
  same numbers the quantised runtime computes with, every expert resident);
* CPU time to quantise every expert of the model, and to dequantise the experts of one decode step
  (two ``[2, rows, cols]`` blocks per layer: top-2 of each of the 8 layers), median of repeats after a
  warm-up call (the machine is shared: compare orders of magnitude, not percents).

A library that is not installed is skipped with a note. The libraries are a comparison, not a
dependency: install them anywhere on the path, e.g.

    pip install --no-deps --target /tmp/qlibs hqq==0.2.8.post1 termcolor optimum-quanto==0.2.7 torchao==0.18.0
    PYTHONPATH=src:/tmp/qlibs python benchmarks/quant_compare.py --tokens 4096 --out docs/results/quant/compare.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GROUP = 64
Codec = tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]  # (quantise, dequantise)


def swapmoe_codec(fmt: str) -> Codec:
    from swapmoe.quant import dequantise, quantise

    return (lambda w: quantise(w, fmt, GROUP)), (lambda p: dequantise(p, fmt, torch.float32))


def hqq_codec(fmt: str, optimize: bool) -> Codec:
    from hqq.core.quantize import Quantizer

    bits = {"int8": 8, "int4": 4}[fmt]

    def q(w: torch.Tensor) -> Any:
        # bitpack: two 4-bit codes per byte, as swapmoe stores them (unpacked codes take twice the bytes)
        return Quantizer.quantize(w, nbits=bits, group_size=GROUP, optimize=optimize, axis=1,
                                  compute_dtype=torch.float32, device="cpu", bitpack=True)

    return q, (lambda p: Quantizer.dequantize(*p))


def torchao_codec(fmt: str) -> Codec:
    from torchao.quantization.quant_primitives import (
        MappingType,
        choose_qparams_affine,
        dequantize_affine,
        quantize_affine,
    )

    block = (1, GROUP)
    if fmt == "int8":
        spec = (MappingType.SYMMETRIC, torch.int8, -127, 127)
    else:
        spec = (MappingType.ASYMMETRIC, torch.uint8, 0, 15)
    mapping, target, lo, hi = spec

    def q(w: torch.Tensor) -> Any:
        s, z = choose_qparams_affine(w, mapping, block, target, lo, hi, scale_dtype=torch.float16,
                                     zero_point_dtype=torch.float16 if fmt == "int4" else torch.int32)
        return quantize_affine(w, block, s, z, target, lo, hi), s, z

    def d(p: Any) -> torch.Tensor:
        return dequantize_affine(p[0], block, p[1], p[2], target, lo, hi, output_dtype=torch.float32)

    return q, d


def quanto_codec(fmt: str) -> Codec:
    from optimum.quanto import AbsmaxOptimizer, MaxOptimizer, qint4, qint8, quantize_weight

    def q(w: torch.Tensor) -> Any:
        if fmt == "int8":  # quanto's int8 weights are per output channel: it has no int8 groups
            return quantize_weight(w, qint8, axis=0, scale=AbsmaxOptimizer()(w, qint8, axis=0), optimized=False)
        s, shift = MaxOptimizer()(w, qint4, axis=0, group_size=GROUP)
        return quantize_weight(w, qint4, axis=0, scale=s, shift=shift, group_size=GROUP, optimized=False)

    return q, (lambda p: p.dequantize())


CODECS: dict[str, Callable[[str], Codec]] = {
    "swapmoe": swapmoe_codec,
    "hqq": lambda f: hqq_codec(f, optimize=True),
    "hqq-no-opt": lambda f: hqq_codec(f, optimize=False),
    "torchao": torchao_codec,
    "quanto": quanto_codec,
}


def expert_weights(model: Any) -> list[torch.nn.Parameter]:
    return [getattr(st.layer.experts, n) for st in model.swapmoe.layers for n in st.layer.expert_param_names
            if getattr(st.layer.experts, n).dim() == 3]


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def markdown_table(record: dict[str, Any]) -> str:
    """The comparison as the docs show it (tests/test_quant_docs.py regenerates it from the JSON)."""
    head = ["quantiser", "format", "relative error", "perplexity", "quantise all experts (s)",
            "dequantise a step's experts (ms)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in record["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['quantiser']} | {r['format']} | skipped: {r['skipped']} | - | - | - |")
            continue
        cells = [r["quantiser"], r["format"],
                 f"{r['relative_error']:.4f}" if "relative_error" in r else "0",
                 f"{r['perplexity']:.3f}",
                 f"{r['quantise_model_s']:.3f}" if "quantise_model_s" in r else "-",
                 f"{r['dequantise_step_ms']:.2f}" if "dequantise_step_ms" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from transformers import AutoTokenizer

    import swapmoe
    from swapmoe.evaluation.perplexity import stream_perplexity, tokenize_text
    from swapmoe.provenance import provenance

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default="data/heldout/all.txt")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = swapmoe.load(None, "100%")  # every expert resident as parameters: fake quantisation in place
    tok = AutoTokenizer.from_pretrained(swapmoe.loader.default_model_path())
    ids = tokenize_text(tok, Path(args.text).read_text(encoding="utf-8"), args.tokens)
    weights = expert_weights(model)
    originals = [w.detach().clone() for w in weights]
    rows: list[dict[str, Any]] = []
    base = stream_perplexity(model, ids, args.window).perplexity
    rows.append({"quantiser": "none (bf16)", "format": "bf16", "perplexity": base})
    print(f"bf16: perplexity {base:.3f}")
    for name, make in CODECS.items():
        for fmt in ("int8", "int4"):
            try:
                quant, dequant = make(fmt)
            except ImportError as e:
                rows.append({"quantiser": name, "format": fmt, "skipped": f"not installed ({e})"})
                print(f"{name} {fmt}: skipped ({e})")
                continue
            flat = [o.float().reshape(-1, o.shape[-1]) for o in originals]  # [E*rows, cols]
            packed = [quant(w) for w in flat]  # also the warm-up of the timings below
            quant_s = _median_s(lambda flat=flat, quant=quant: [quant(w) for w in flat], max(1, args.repeats // 2))
            err_num = err_den = 0.0
            for w, o, f, p in zip(weights, originals, flat, packed, strict=True):
                back = dequant(p).reshape(o.shape)
                err_num += float((back - f.reshape(o.shape)).pow(2).sum())
                err_den += float(f.pow(2).sum())
                w.data.copy_(back.to(w.dtype))
            ppl = stream_perplexity(model, ids, args.window).perplexity
            # one decode step's experts: two experts' rows of each weight, quantised as a block
            step = [quant(o[:2].float().reshape(-1, o.shape[-1])) for o in originals]
            [dequant(p) for p in step]  # warm-up
            deq_s = _median_s(lambda step=step, dequant=dequant: [dequant(p) for p in step], args.repeats)
            for w, o in zip(weights, originals, strict=True):
                w.data.copy_(o)
            row = {"quantiser": name, "format": fmt, "relative_error": (err_num / err_den) ** 0.5,
                   "perplexity": ppl, "quantise_model_s": quant_s, "dequantise_step_ms": deq_s * 1e3}
            rows.append(row)
            print(f"{name} {fmt}: error {row['relative_error']:.4f}, perplexity {ppl:.3f}, quantise {quant_s:.2f}s, "
                  f"dequantise a step's experts {deq_s * 1e3:.2f} ms")
    record = {"tokens": len(ids) - 1, "window": args.window, "group_size": GROUP, "threads": torch.get_num_threads(),
              "rows": rows, "provenance": provenance(torch.device("cpu"))}
    print(markdown_table(record))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
