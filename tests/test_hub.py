"""Models named by their Hugging Face repo id, resolved offline from a cache laid out as huggingface_hub
lays it out (``models--org--name/{blobs,refs,snapshots}``), built here in a temporary directory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

import swapmoe
from swapmoe import cli
from swapmoe.errors import CheckpointError
from swapmoe.hub import looks_like_repo_id, resolve_model
from tests.matrix import prompt
from tests.threads import single_torch_thread
from tests.tiny_models import make_checkpoint, save_tokenizer

REPO = "tiny-org/qwen3-moe-tiny"
COMMIT_MAIN = "a" * 40
COMMIT_V2 = "b" * 40


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_torch_thread():
        yield


def add_to_cache(cache: Path, repo_id: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put the files of ``source`` into ``cache`` as huggingface_hub stores a downloaded snapshot:
    content-addressed blobs, ``snapshots/<commit>/<file>`` symlinks to them, ``refs/<ref>`` -> commit."""
    org, name = repo_id.split("/")
    repo = cache / f"models--{org}--{name}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(source.rglob("*")):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / f.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two revisions of one tiny model (different weights), each with a tokenizer."""
    root = tmp_path_factory.mktemp("hub-sources")
    out = {}
    for commit, seed in ((COMMIT_MAIN, 0), (COMMIT_V2, 1)):
        path = make_checkpoint("qwen3_moe", root / commit[:4], layout="fused", sharded=True, seed=seed)
        save_tokenizer(path)
        out[commit] = path
    return out


@pytest.fixture
def cache(tmp_path, sources, monkeypatch):
    """An offline Hub cache holding REPO at main and at v2 (HF_HUB_CACHE points there)."""
    root = tmp_path / "hub"
    add_to_cache(root, REPO, sources[COMMIT_MAIN], COMMIT_MAIN)
    add_to_cache(root, REPO, sources[COMMIT_V2], COMMIT_V2, refs=("v2",))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(prompt(seed=3)).logits


def test_load_by_repo_id_offline_reads_the_cached_snapshot(cache, sources):
    by_id = swapmoe.load(REPO, "100%", device="cpu", dtype="float32")
    by_dir = swapmoe.load(sources[COMMIT_MAIN], "100%", device="cpu", dtype="float32")
    assert torch.equal(_logits(by_id), _logits(by_dir))
    assert resolve_model(REPO) == cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT_MAIN


@pytest.mark.parametrize("revision", ["v2", COMMIT_V2], ids=["branch", "commit"])
def test_a_revision_selects_its_snapshot(cache, sources, revision):
    model = swapmoe.load(REPO, "50%", device="cpu", dtype="float32", revision=revision, swaps_per_update=0)
    ref = swapmoe.load(sources[COMMIT_V2], "50%", device="cpu", dtype="float32", swaps_per_update=0)
    main = swapmoe.load(REPO, "50%", device="cpu", dtype="float32", swaps_per_update=0)
    assert torch.equal(_logits(model), _logits(ref))
    assert not torch.equal(_logits(model), _logits(main))


def test_a_model_missing_offline_is_a_one_line_error_that_says_so(cache):
    with pytest.raises(CheckpointError) as err:
        swapmoe.load("nobody/absent-model", "50%", device="cpu")
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert "nobody/absent-model" in message and "not in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE" in message and str(cache) in message
    with pytest.raises(CheckpointError, match="revision nope"):  # a revision the cache does not hold
        swapmoe.load(REPO, "50%", device="cpu", revision="nope")


def test_a_cached_repo_gets_the_same_checkpoint_checks(cache):
    """A truncated shard in the cache is named, as in a checkpoint directory."""
    snapshot = resolve_model(REPO)
    shard = sorted(snapshot.glob("*.safetensors"))[-1]
    shard.resolve().write_bytes(shard.read_bytes()[:100])  # the blob the snapshot's link points to
    with pytest.raises(CheckpointError, match=shard.name):
        swapmoe.load(REPO, "50%", device="cpu")


def test_cli_generate_and_info_take_a_repo_id_and_a_revision(cache, capsys):
    argv = ["generate", REPO, "--revision", "v2", "-m", "50%", "--device", "cpu", "-p", "a b c", "-n", "3"]
    assert cli.main(argv) == 0
    assert "3 new tokens" in capsys.readouterr().err
    assert cli.main(["info", REPO]) == 0
    assert "qwen3_moe" in capsys.readouterr().err
    assert cli.main(["generate", "nobody/absent-model", "-p", "a", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not in the local Hugging Face cache" in err


def test_an_existing_path_wins_over_a_repo_id_and_takes_no_revision(tmp_path, sources, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    local = Path("tiny-org") / "local-copy"
    local.parent.mkdir()
    local.symlink_to(sources[COMMIT_MAIN], target_is_directory=True)
    assert not looks_like_repo_id(str(local))
    stats = swapmoe.load(str(local), "100%", device="cpu").swapmoe.stats()["total"]
    assert stats["resident_bytes"] == stats["total_expert_bytes"] > 0
    with pytest.raises(CheckpointError, match="drop --revision"):
        swapmoe.load(str(local), "100%", device="cpu", revision="main")


@pytest.mark.parametrize(("text", "expected"), [
    ("Qwen/Qwen3-30B-A3B", True), ("mistralai/Mixtral-8x7B-v0.1", True), ("org/name.v2", True),
    ("./org/name", False), ("/abs/path", False), ("~/models/x", False), ("a/b/c", False), ("plain", False),
    ("org/../x", False),
])
def test_what_reads_as_a_repo_id(text, expected):
    assert looks_like_repo_id(text) is expected
