"""A tiny MoE model (half of its experts resident) and its tokenizer, built once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import swapmoe
from tests.engine.tiny import build_checkpoint
from tests.threads import single_torch_thread


@pytest.fixture(scope="session")
def engine_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("engine-moe"))


@pytest.fixture(scope="session")
def tokenizer(engine_checkpoint: Path):
    return AutoTokenizer.from_pretrained(engine_checkpoint)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny model: intra-op threads only add contention on a 2-core machine (restored after the module)."""
    with single_torch_thread():
        yield


@pytest.fixture(scope="session")
def model(engine_checkpoint: Path) -> torch.nn.Module:
    """Masked Gating on, resident set fixed (swaps_per_update=0): outputs depend only on the input."""
    return swapmoe.load(engine_checkpoint, "50%", device="cpu", swaps_per_update=0)
