"""A tiny Qwen3-MoE checkpoint and one small profile of it, shared by the planner tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.engine.tiny import SENTENCES, build_checkpoint
from tests.threads import single_torch_thread

TEXT = " ".join(SENTENCES[:5]) * 3


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny model: intra-op threads only add contention on a 2-core machine (restored after the module)."""
    with single_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("planner") / "tiny-moe")


@pytest.fixture(scope="session")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("calibration") / "calibration.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


# the smallest profile that still has every kind of run (about a dozen configurations)
SMALL = ["--max-tokens", "64", "--window", "16", "--decode-tokens", "4", "--layer-points", "2", "--uniform", "50%",
         "--intervals", "1,16", "--holdout", "1", "--timing-repeats", "3", "--device", "cpu"]


@pytest.fixture(scope="session")
def tiny_profile(tiny_ckpt: Path, calibration: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """``swapmoe profile`` on the tiny checkpoint: (path of profile.json, the profile)."""
    from swapmoe.cli import main
    from swapmoe.planner.profile import read_profile

    out = tmp_path_factory.mktemp("profile") / "profile.json"
    with single_torch_thread():
        assert main(["profile", str(tiny_ckpt), "--calibration", str(calibration), "--out", str(out), *SMALL]) == 0
    return out, read_profile(out)
