"""What a fixed (or reset) resident set costs and buys: `swapmoe serve` in five settings on one workload.

Settings: 100% of the experts (the reference), 50% adaptive (the default: SwapMoE moves experts
toward the text served), 50% fixed after a start-up warm-up text (`--resident-set fixed
--warmup-file`), 50% fixed at the set chosen at load (`--resident-set fixed`, no warm-up: the
same as `--swaps-per-update 0`), and 50% reset to the warm-up's state before every request
(`--resident-set reset --warmup-file`). The workload scores 18 held-out passages, three per genre, genre
by genre (echo + logprobs, as lm-eval does), and between genres sends one probe request (greedy,
32 tokens) seven times in all; then the probe once alone and six times among concurrent other
requests. Reported per setting: perplexity of the passages, the expert hit rate (over the passages
and the sequential probes), how many different answers the seven identical probes got, how many
probes under load differed from the one sent alone, and the wall time of the sequential part.

    python scripts/resident_set_cost.py --out /tmp/resident.json      # a few minutes on 2 CPU cores

The warm-up text is taken from the first half of each genre file, the passages from the second
half. Only 127.0.0.1 is contacted; each server is stopped after its run.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from serving import free_port, start_serve

from swapmoe.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]
GENRES = ["detective", "drama", "encyclopedia", "fairy_tale", "history", "medicine"]
PROBE = {"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}


def texts() -> tuple[str, dict[str, list[str]]]:
    """(warm-up text from the first halves, three 2,000-character passages per genre from the second)."""
    warmup, passages = [], {}
    for genre in GENRES:
        text = (ROOT / "data" / "heldout" / f"{genre}.txt").read_text(encoding="utf-8")
        half = len(text) // 2
        warmup.append(text[:4000])
        passages[genre] = [text[half + k * 6000: half + k * 6000 + 2000] for k in range(3)]
    return "\n\n".join(warmup), passages


def run(url: str, passages: dict[str, list[str]]) -> dict[str, float]:
    nll, tokens, probes = 0.0, 0, []
    start = time.monotonic()
    with httpx.Client(base_url=url, timeout=300) as http:
        probes.append(http.post("/v1/completions", json=PROBE).json()["choices"][0]["text"])
        for genre in GENRES:
            for passage in passages[genre]:
                lp = http.post("/v1/completions", json={"prompt": passage, "max_tokens": 0, "echo": True,
                                                        "logprobs": 0}).json()["choices"][0]["logprobs"]
                values = [v for v in lp["token_logprobs"] if v is not None]
                nll -= sum(values)
                tokens += len(values)
            probes.append(http.post("/v1/completions", json=PROBE).json()["choices"][0]["text"])
        wall = time.monotonic() - start
        metrics = http.get("/metrics").text
        # under load: the probe among concurrent other requests, against the probe sent alone just before
        alone = http.post("/v1/completions", json=PROBE).json()["choices"][0]["text"]
        others = [{"prompt": passages[g][0][:400], "max_tokens": 16, "temperature": 0.8, "seed": i}
                  for i, g in enumerate(GENRES)]
        with ThreadPoolExecutor(4) as pool:
            loaded = [pool.submit(lambda: httpx.post(f"{url}/v1/completions", json=PROBE, timeout=300)) for _ in range(6)]
            for body in others:
                pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=300)
            differ = sum(f.result().json()["choices"][0]["text"] != alone for f in loaded)
    hit = next(float(line.split()[1]) for line in metrics.splitlines() if line.startswith("swapmoe_expert_hit_rate "))
    return {"perplexity": round(math.exp(nll / tokens), 3), "hit_rate": round(hit, 4),
            "distinct_probe_answers": len(set(probes)), "probes": len(probes),
            "under_load_differ": differ, "under_load_probes": len(loaded), "wall_s": round(wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    warmup, passages = texts()
    with tempfile.TemporaryDirectory() as tmp:
        warmup_file = Path(tmp) / "warmup.txt"
        warmup_file.write_text(warmup, encoding="utf-8")
        settings = {
            "100% (reference)": ["-m", "100%"],
            "50% adaptive (default)": ["-m", "50%"],
            "50% fixed after --warmup-file": ["-m", "50%", "--resident-set", "fixed", "--warmup-file", str(warmup_file)],
            "50% fixed at load": ["-m", "50%", "--resident-set", "fixed"],
            "50% reset after --warmup-file": ["-m", "50%", "--resident-set", "reset", "--warmup-file",
                                              str(warmup_file)],
        }
        report = {}
        for name, options in settings.items():
            port = free_port()
            proc = start_serve(options, port, within=300)
            try:
                report[name] = run(f"http://127.0.0.1:{port}", passages)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
            print(name, report[name], flush=True)
    print("| setting | perplexity | hit rate | different answers to 7 identical probes | probes under load "
          "unlike the probe alone | wall s |")
    print("|---|---|---|---|---|---|")
    for name, r in report.items():
        print(f"| {name} | {r['perplexity']} | {r['hit_rate']} | {r['distinct_probe_answers']} | "
              f"{r['under_load_differ']} of {r['under_load_probes']} | {r['wall_s']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"provenance": provenance(), "settings": report}, indent=2) + "\n")


if __name__ == "__main__":
    main()
