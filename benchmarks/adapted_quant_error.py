"""Quantised experts on the adapted families: how far each format moves the logits at a 100% budget.

For each adapted family (tests/adapters/tiny.py: Llama 4 text, Switch, DBRX, JetMoE, LongCat-Flash)
and each seed, a tiny random checkpoint is saved and loaded with every expert resident:

* in float32, with the experts held as bf16 (a cast), int8, int4 and int2, against the float32 model;
* in bfloat16 (as Llama 4 and DBRX are published), with int8 and int4 experts, against the bf16
  model, next to the same model computed in float32 (what float rounding alone moves).

Per row: mean and largest |logit difference|, mean KL(reference || quantised) in nats and top-1
agreement over one 16-token prompt. These are the figures the tolerances of
tests/adapters/test_adapted_quantised.py were set from (docs/quantization.md, "Tests"). Tiny random
models say nothing about the accuracy of a real checkpoint; they check that the mechanism computes
what each format should, with errors ordered by bits.

    PYTHONPATH=src:. python benchmarks/adapted_quant_error.py --seeds 0,1,2 \\
        --out docs/results/quant/adapted-families.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

F32_FORMATS = ("bf16", "int8", "int4", "int2")
BF16_FORMATS = ("int8", "int4")


def compare(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Mean and largest |difference|, mean KL(ref || out) (nats) and top-1 agreement of ``[.., V]`` logits."""
    ref, out = ref.float(), out.float()
    d = (out - ref).abs()
    p = ref.log_softmax(-1)
    kl = (p.exp() * (p - out.log_softmax(-1))).sum(-1).mean()
    return {"mean_abs": float(d.mean()), "max_abs": float(d.max()), "kl": float(kl),
            "top1_agree": float((out.argmax(-1) == ref.argmax(-1)).float().mean())}


def measure(family: str, seed: int, where: Path) -> dict[str, Any]:
    from tests.adapters.test_adapted_families import _logits
    from tests.adapters.tiny import make_checkpoint
    from tests.matrix import prompt

    import swapmoe

    path = make_checkpoint(family, where / f"{family}-{seed}", seed=seed)
    ids = prompt(batch=1, length=16)

    def logits(dtype: torch.dtype, fmt: str | None = None) -> torch.Tensor:
        return _logits(swapmoe.load(path, "100%", device="cpu", dtype=dtype, expert_dtype=fmt), ids).float()

    f32 = logits(torch.float32)
    bf16 = logits(torch.bfloat16)
    return {
        "family": family, "seed": seed, "tokens": ids.shape[1],
        "float32": {fmt: compare(f32, logits(torch.float32, fmt)) for fmt in F32_FORMATS},
        "bfloat16": {"float32_compute": compare(bf16, f32),
                     **{fmt: compare(bf16, logits(torch.bfloat16, fmt)) for fmt in BF16_FORMATS}},
    }


def main(argv: list[str] | None = None) -> int:
    from tests.adapters.tiny import ADAPTED
    from tests.threads import single_torch_thread

    from swapmoe.provenance import provenance

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated checkpoint seeds")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, single_torch_thread():
        for seed in seeds:
            for family in ADAPTED:
                rows.append(measure(family, seed, Path(tmp)))
                r = rows[-1]
                print(f"{family} seed {seed}: int8/bf16 mean {r['float32']['int8']['mean_abs'] / r['float32']['bf16']['mean_abs']:.2f}x, "
                      f"bf16 model int8/f32 {r['bfloat16']['int8']['mean_abs'] / r['bfloat16']['float32_compute']['mean_abs']:.2f}x",
                      flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"provenance": provenance("cpu"), "seeds": seeds, "budget": "100%",
                                    "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
