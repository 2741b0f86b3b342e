"""Start ``swapmoe serve`` from this source tree in a subprocess and wait until it answers ``/health``
(shared by the server scripts in this folder; run them as ``python scripts/NAME.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def start_serve(args: list[str], port: int, *, within: float = 180, quiet: bool = True) -> subprocess.Popen:
    """``swapmoe serve [args] --port PORT --log-level warning``, ready; raises SystemExit if it exits or
    does not answer within ``within`` seconds (then it is killed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen([sys.executable, "-m", "swapmoe.cli", "serve", *args, "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"swapmoe serve {' '.join(args)} exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"swapmoe serve {' '.join(args)} did not start within {within:.0f} s")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
