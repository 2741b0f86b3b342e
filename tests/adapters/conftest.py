"""Fixtures of the adapted-family tests: one torch thread, and tiny checkpoints built once."""

from __future__ import annotations

import pytest

from tests.adapters.tiny import make_checkpoint
from tests.threads import single_torch_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (and far faster than several on a busy 2-core machine)."""
    with single_torch_thread():
        yield


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(family, sharded=False, variant="plain")`` -> a saved tiny checkpoint (built once);
    ``variant="skewed"`` has every router prefer expert 6 (see ``tiny.skew``)."""
    from tests.adapters.tiny import skew

    cache: dict[tuple, object] = {}

    def get(family: str, sharded: bool = False, variant: str = "plain"):
        key = (family, sharded, variant)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{family}-{'sharded' if sharded else 'single'}-{variant}")
            cache[key] = make_checkpoint(family, path, sharded=sharded, edit=skew if variant == "skewed" else None)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def switch_with_tokenizer(tmp_path_factory):
    """A tiny Switch checkpoint with a tokenizer beside it, for the CLI's text-to-text path."""
    from tests.tiny_models import save_tokenizer

    path = make_checkpoint("switch_transformers", tmp_path_factory.mktemp("switch-tok"))
    save_tokenizer(path)
    return path
