"""Ten large prompts at once against `swapmoe serve`: /health latency, a stream's gaps, resident memory.

Starts `swapmoe serve` (the bundled model unless --model) on a free loopback port, warms it up, then
sends --count prompts of --megabytes MB each at the same time (half completions, half chat) while
one client polls /health every 50 ms and another streams a completion. Prints a Markdown table and
writes JSON (--out). Resident memory is the server process's VmRSS (Linux): before the burst, the
highest seen during it, and 3 s after it.

    python scripts/server_big_prompts.py                      # 10 x 7.5 MB, -m 50%
    python scripts/server_big_prompts.py --count 3 --megabytes 2 --out /tmp/big.json

Only 127.0.0.1 is contacted; every loop is bounded and the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from serving import free_port, start_serve

from swapmoe.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def body(i: int, size: int) -> bytes:
    text = ("The quick brown fox jumps over the lazy dog. " * (size // 45 + 1))[:size]
    if i % 2:
        return json.dumps({"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 4}).encode()
    return json.dumps({"model": "m", "prompt": text, "max_tokens": 4}).encode()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--memory-budget", "-m", default="50%")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--megabytes", type=float, default=7.5)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve([*([args.model] if args.model else []), "-m", args.memory_budget, "--served-model-name", "m"],
                       port)
    try:
        httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 8}, timeout=60)
        time.sleep(1)
        rss_before = rss_mb(proc.pid)
        size = int(args.megabytes * 1e6)
        bodies = [body(i, size) for i in range(args.count)]
        done = threading.Event()
        health: list[float] = []
        peak = [rss_before]
        gaps: list[float] = []

        def poll() -> None:
            with httpx.Client(timeout=120) as c:
                while not done.is_set():
                    t = time.monotonic()
                    assert c.get(f"{url}/health").status_code == 200
                    health.append(time.monotonic() - t)
                    peak[0] = max(peak[0], rss_mb(proc.pid))
                    time.sleep(0.05)

        def stream() -> None:
            with httpx.Client(timeout=120) as c, c.stream("POST", f"{url}/v1/completions", json={
                    "prompt": "Once upon a time", "max_tokens": 400, "stream": True}) as r:
                last = time.monotonic()
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        now = time.monotonic()
                        gaps.append(now - last)
                        last = now

        def send(b: bytes) -> tuple[int, str, float]:
            path = "/v1/chat/completions" if b'"messages"' in b[:40] else "/v1/completions"
            t = time.monotonic()
            r = httpx.post(f"{url}{path}", content=b, headers={"Content-Type": "application/json"}, timeout=300)
            code = r.json().get("error", {}).get("code") if r.status_code != 200 else "ok"
            return r.status_code, code, time.monotonic() - t

        with ThreadPoolExecutor(args.count + 2) as pool:
            poller = pool.submit(poll)
            streamer = pool.submit(stream)
            time.sleep(0.5)  # the stream is under way
            start = time.monotonic()
            results = list(pool.map(send, bodies))
            burst = time.monotonic() - start
            streamer.result(timeout=300)
            done.set()
            poller.result(timeout=60)
        time.sleep(3)
        rss_after = rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    health_ms = sorted(h * 1000 for h in health)
    report = {
        "prompts": args.count, "megabytes_each": args.megabytes, "memory_budget": args.memory_budget,
        "answers": sorted({f"{s} {c}" for s, c, _ in results}),
        "burst_s": round(burst, 2), "slowest_answer_s": round(max(t for _, _, t in results), 2),
        "health_polls": len(health_ms), "health_median_ms": round(statistics.median(health_ms), 1),
        "health_p99_ms": round(health_ms[int(0.99 * (len(health_ms) - 1))], 1),
        "health_max_ms": round(health_ms[-1], 1),
        "stream_chunks": len(gaps), "stream_max_gap_ms": round(max(gaps[1:] or [0]) * 1000, 1),
        "rss_before_mb": round(rss_before), "rss_peak_mb": round(peak[0]), "rss_after_mb": round(rss_after),
    }
    print("| " + " | ".join(report) + " |")
    print("|" + "---|" * len(report))
    print("| " + " | ".join(str(v) for v in report.values()) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"provenance": provenance(), **report}, indent=2) + "\n")


if __name__ == "__main__":
    main()
