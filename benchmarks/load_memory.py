"""Host memory while loading: plain transformers, swapmoe, and swapmoe with a host budget.

Builds a Qwen3-MoE-shaped model with random bf16 weights (experts dominate its size), saves it in
both checkpoint layouts (``legacy``: the per-expert names most published checkpoints use, which
transformers fuses while loading; ``fused``: transformers 5.x's own names), and loads each one in a
fresh process per setting, sampling the process's anonymous resident memory (``RssAnon``: what
the loaded tensors occupy; pages of the memory-mapped safetensors files are file-backed and the
kernel can drop them) every 5 ms. Linux only.

    python benchmarks/load_memory.py --out runs/load-memory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

SETTINGS = {
    "plain transformers": None,
    "swapmoe 25%": {},
    "swapmoe 25%, host budget 25%": {"host_budget": "25%"},
    "swapmoe 25%, host budget 0": {"host_budget": 1},
}

_CHILD = r"""
import json, sys, threading, time
def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon'):
            return int(line.split()[1]) * 1024
import torch, swapmoe
from transformers import AutoModelForCausalLM
path, kw = sys.argv[1], json.loads(sys.argv[2])
base = anon(); peak = [base]; done = [False]
def poll():
    while not done[0]:
        peak[0] = max(peak[0], anon()); time.sleep(0.005)
t = threading.Thread(target=poll); t.start()
if kw is None:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
else:
    model = swapmoe.load(path, "25%", device="cpu", dtype="bfloat16", **kw)
after = anon(); done[0] = True; t.join()
print(json.dumps({"base": base, "peak": max(peak[0], after), "after": after}))
"""


def build(out: Path, layers: int, experts: int, hidden: int, inter: int) -> dict[str, Path]:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.tiny_models import build_model, save_checkpoint

    model = build_model("qwen3_moe", dtype=torch.bfloat16, hidden_size=hidden, moe_intermediate_size=inter,
                        num_experts=experts, num_hidden_layers=layers, vocab_size=1000)
    paths = {}
    for layout in ("legacy", "fused"):
        paths[layout] = out / f"model-{layout}"
        if not (paths[layout] / "config.json").is_file():
            save_checkpoint(model, paths[layout], layout=layout)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/load-memory"), help="folder for the checkpoints it builds")
    p.add_argument("--results", type=Path, default=None, help="the JSON to write (default: OUT/load_memory.json)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--inter", type=int, default=768)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    paths = build(args.out, args.layers, args.experts, args.hidden, args.inter)
    size = sum(f.stat().st_size for f in paths["fused"].glob("*.safetensors"))
    rows = []
    for layout, path in paths.items():
        for name, kw in SETTINGS.items():
            res = subprocess.run([sys.executable, "-c", _CHILD, str(path), json.dumps(kw)], capture_output=True,
                                 text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append({"layout": layout, "setting": name, "peak_bytes": r["peak"] - r["base"],
                         "after_bytes": r["after"] - r["base"]})
    table = Table(title=f"host memory while loading a {size / 2**20:.0f} MiB checkpoint (RssAnon above the "
                        "process's start)")
    for col in ("layout", "setting", "peak MiB", "after load MiB", "peak / checkpoint"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["layout"], r["setting"], f"{r['peak_bytes'] / 2**20:.0f}", f"{r['after_bytes'] / 2**20:.0f}",
                      f"{r['peak_bytes'] / size:.2f}")
    Console().print(table)
    from swapmoe.provenance import provenance

    results = args.results or args.out / "load_memory.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"checkpoint_bytes": size, "rows": rows, "provenance": provenance("cpu")}, indent=2)
                       + "\n")
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
