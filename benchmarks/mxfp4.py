"""A gpt-oss checkpoint in MXFP4, as published: experts held as MXFP4 against the same experts converted
to bf16, int8 and int4 at load, at the same slot count. Batch-1 decode through one CUDA graph replay per
token where every setting can be captured, else static-cache steps for all (the reason is recorded;
swapmoe.engine.timing.time_decode, alternating rounds, teacher-forced on one random stream), the
true bytes of the slots, and each setting's logits against the bf16 conversion's (the same weights:
MXFP4 decodes exactly to bf16).

The model has gpt-oss-20b's per-layer shapes (hidden 2880, 32 experts, top-4, expert intermediate 2880)
with fewer layers and a smaller vocabulary (random weights; speed and bytes only), saved with
swapmoe.mxfp4.save_mxfp4.

    python benchmarks/mxfp4.py --out runs/mxfp4                                   # on the GPU machine
    python benchmarks/mxfp4.py --layers 2 --hidden 64 --device cpu --out runs/t   # smoke test anywhere
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import swapmoe
from swapmoe.engine.decoder import Decoder, graph_blocker
from swapmoe.engine.timing import time_decode
from swapmoe.mxfp4 import save_mxfp4
from swapmoe.provenance import provenance

SETTINGS = (("mxfp4 (as published)", None), ("bf16", "bf16"), ("int8", "int8"), ("int4", "int4"))


def build(path: Path, layers: int, hidden: int, vocab: int, device: torch.device) -> float:
    """Random gpt-oss weights of the given shapes saved in MXFP4 at ``path`` (reused when there)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (path / "config.json").is_file():
        return 0.0
    t0 = time.perf_counter()
    config = AutoConfig.for_model("gpt_oss", hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers,
                                  num_local_experts=32, num_experts_per_tok=4, num_attention_heads=64,
                                  num_key_value_heads=8, head_dim=64, vocab_size=vocab, max_position_embeddings=4096,
                                  layer_types=["sliding_attention", "full_attention"] * (layers // 2))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    save_mxfp4(model, path)
    del model
    gc.collect()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2880, help="hidden and expert intermediate size (gpt-oss: 2880)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--slots", type=int, default=16, help="slots per MoE layer, of 32 experts")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    dev = torch.device(args.device)
    path = args.model_dir or Path(f"/tmp/swapmoe-bench-gpt-oss-mxfp4-{args.layers}x{args.hidden}")
    build_s = build(path, args.layers, args.hidden, args.vocab, dev)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab, (16,), generator=gen).tolist()
    feed = torch.randint(0, args.vocab, (args.tokens + 4,), generator=gen).tolist()
    mode = "graph"
    models: dict[str, Any] = {}
    for name, fmt in SETTINGS:
        models[name] = swapmoe.load(path, slots=[args.slots] * args.layers, device=dev, expert_dtype=fmt)
    blocked = {name: why for name, m in models.items() if (why := graph_blocker(m)) is not None}
    mode = "static" if blocked else "graph"  # one mode for every setting, so that they compare
    ids = torch.tensor([prompt], device=dev)
    with torch.inference_mode():  # each model's first forward: the same resident sets, before any swap
        first = {name: m(ids).logits.float() for name, m in models.items()}
    diffs = {name: float((x - first["bf16"]).abs().max()) for name, x in first.items()}
    decoders = {name: Decoder(m, mode) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):  # alternating rounds: the host's noise lands on every setting alike
        for name, dec in decoders.items():
            t = time_decode(models[name], prompt, args.tokens, feed=feed, warmup=2, decoder=dec)
            times[name].append(1000 * statistics.median(t.step_s))
    rows = []
    for name, m in models.items():
        st = m.swapmoe.stats()["total"]
        rows.append({"setting": name, "slots": st["slots"], "resident_bytes": st["resident_bytes"],
                     "expert_bytes": m.swapmoe.layers[0].pool.store.expert_bytes(),
                     "ms_per_token_min": min(times[name]), "ms_per_token_median": statistics.median(times[name]),
                     "max_abs_logit_diff_vs_bf16": diffs[name], "swaps": st["swaps"]})
    record = {"rows": rows, "meta": {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab,
                                     "slots_per_layer": args.slots, "experts": 32, "top_k": 4, "tokens": args.tokens,
                                     "rounds": args.rounds, "mode": mode, "graph_blocked": blocked,
                                     "build_s": build_s},
              "provenance": provenance(dev)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mxfp4.json").write_text(json.dumps(record, indent=2))
    print(markdown_table(record))


def markdown_table(record: dict[str, Any]) -> str:
    lines = ["| setting | slots | bytes per expert | resident MiB | ms/token min | ms/token median | max logit diff vs bf16 |",
             "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {r['setting']} | {r['slots']} | {r['expert_bytes']:,} | {r['resident_bytes'] / 2**20:.1f} | "
                     f"{r['ms_per_token_min']:.2f} | {r['ms_per_token_median']:.2f} | "
                     f"{r['max_abs_logit_diff_vs_bf16']:.4g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
