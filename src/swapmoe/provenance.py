"""What produced a result file: library versions, the device and the git commit.

Every JSON a command or benchmark writes carries :func:`provenance` under the key ``"provenance"``, so
that a figure in the docs can be traced to the code and the machine that measured it (issue 12: a
number without them cannot be checked or reproduced).
"""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch


def git_commit(where: Path | None = None) -> str | None:
    """The commit of the checkout swapmoe runs from, ``+dirty`` with uncommitted changes; None outside git."""
    cwd = where or Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name for a CUDA device, else the host CPU as the OS reports it. ``None`` means what
    swapmoe's commands default to: the GPU when there is one."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return f"cpu: {platform.processor() or platform.machine()}"


def provenance(device: torch.device | str | None = None) -> dict[str, Any]:
    """torch, transformers, Python, device name, git commit and the time (UTC) of this measurement."""
    import transformers

    import swapmoe

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "swapmoe": swapmoe.__version__,
        "device": device_name(device),
        "git_commit": git_commit(),
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
