"""Low-bit expert formats compared on the reference model: zero point (HQQ or min-max) and group size.

For each candidate (bits, group size, zero point refined as HQQ does or left at the group's minimum),
every expert weight of the reference model is quantised with :func:`swapmoe.quant.quantise` and
dequantised in place (every expert resident: the accuracy of the format alone, without Masked
Gating), and we report

* bytes per weight as stored (codes, float16 scales and zero points; ``swapmoe.quant.part_specs``),
  and how many experts of a layer the 12.5% and 25% budgets then hold (bf16 holds 2 and 4 of 16);
* the relative error ``||W' - W|| / ||W||`` over all expert weights;
* the perplexity of the held-out text (the same window and tokens as the sweep).

It chose the defaults of int3 and int2 (docs/quantization.md). The held-out text is the only text the
project has; the choice is between a handful of structural options (no parameter is fitted to it).

    PYTHONPATH=src python benchmarks/lowbit_formats.py --tokens 4096 --out docs/results/quant/lowbit-formats.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_compare import expert_weights  # noqa: E402

CANDIDATES = [  # (format, group, refine)
    ("int4", 64, False), ("int4", 64, True),
    ("int3", 32, False), ("int3", 32, True), ("int3", 64, False), ("int3", 64, True), ("int3", 128, True),
    ("int2", 16, True), ("int2", 32, False), ("int2", 32, True), ("int2", 64, False), ("int2", 64, True),
    ("int2", 128, True),
]


def bytes_per_weight(shapes: list[tuple[int, ...]], fmt: str, group: int) -> float:
    from swapmoe.quant import part_specs

    total = sum(torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
                for s in shapes for shape, dt in part_specs(s, fmt, group).values())
    return total / sum(torch.Size(s).numel() for s in shapes)


def markdown_table(record: dict[str, Any]) -> str:
    """The comparison as the docs show it (tests/test_quant_docs.py regenerates it from the JSON)."""
    head = ["format", "group", "zero point", "bytes per weight", "experts at 12.5%", "experts at 25%",
            "relative error", "perplexity (all resident)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in record["rows"]:
        cells = [r["format"], str(r["group"]), "HQQ" if r["refine"] else "min-max", f"{r['bytes_per_weight']:.4f}",
                 f"{r['experts_at_12.5%']:.1f}", f"{r['experts_at_25%']:.1f}", f"{r['relative_error']:.4f}",
                 f"{r['perplexity']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from transformers import AutoTokenizer

    import swapmoe
    from swapmoe.evaluation.perplexity import stream_perplexity, tokenize_text
    from swapmoe.provenance import provenance
    from swapmoe.quant import dequantise, quantise

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default="data/heldout/all.txt")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    model = swapmoe.load(None, "100%")  # every expert resident as parameters: fake quantisation in place
    tok = AutoTokenizer.from_pretrained(swapmoe.loader.default_model_path())
    ids = tokenize_text(tok, Path(args.text).read_text(encoding="utf-8"), args.tokens)
    weights = expert_weights(model)
    originals = [w.detach().clone() for w in weights]
    shapes = [tuple(o.shape[1:]) for o in originals]  # one expert's matrices
    bf16_bpw = 2.0
    rows: list[dict[str, Any]] = []
    base = stream_perplexity(model, ids, args.window).perplexity
    print(f"bf16: perplexity {base:.3f}")
    for fmt, group, refine in CANDIDATES:
        err_num = err_den = 0.0
        for w, o in zip(weights, originals, strict=True):
            f = o.float()
            back = dequantise(quantise(f, fmt, group, refine=refine), fmt, torch.float32)
            err_num += float((back - f).pow(2).sum())
            err_den += float(f.pow(2).sum())
            w.data.copy_(back.to(w.dtype))
        ppl = stream_perplexity(model, ids, args.window).perplexity
        for w, o in zip(weights, originals, strict=True):
            w.data.copy_(o)
        bpw = bytes_per_weight(shapes, fmt, group)
        row = {"format": fmt, "group": group, "refine": refine, "bytes_per_weight": bpw,
               "experts_at_12.5%": 2 * bf16_bpw / bpw, "experts_at_25%": 4 * bf16_bpw / bpw,
               "relative_error": (err_num / err_den) ** 0.5, "perplexity": ppl}
        rows.append(row)
        print(f"{fmt} g{group} {'hqq' if refine else 'minmax'}: {bpw:.4f} B/w, error {row['relative_error']:.4f}, "
              f"perplexity {ppl:.3f}", flush=True)
    record = {"tokens": len(ids) - 1, "window": args.window, "bf16_perplexity": base, "rows": rows,
              "provenance": provenance(torch.device("cpu"))}
    print(markdown_table(record))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
