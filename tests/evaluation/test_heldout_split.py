"""The held-out text in data/heldout is rebuilt byte for byte by scripts/reference/split_data.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts" / "reference"))

import split_data  # noqa: E402

DATA = split_data.default_data_dir()


@pytest.mark.skipif(not (DATA / "SHA256SUMS").is_file(), reason=f"source text not found at {DATA}")
def test_split_rebuilds_heldout_byte_for_byte(tmp_path):
    written = split_data.write_heldout(split_data.make_split(DATA), DATA, tmp_path)
    committed = sorted(p.name for p in (REPO / "data" / "heldout").iterdir())
    assert sorted(p.name for p in written) == committed
    for path in written:
        assert path.read_bytes() == (REPO / "data" / "heldout" / path.name).read_bytes(), path.name


@pytest.mark.skipif(not (DATA / "SHA256SUMS").is_file(), reason=f"source text not found at {DATA}")
def test_split_keeps_documents_whole_and_apart():
    split = split_data.make_split(DATA)
    for domain in split_data.DOMAINS:
        train = {d.text for d in split.train[domain]}
        held = {d.text for d in split.heldout[domain]}
        valid = {d.text for d in split.valid[domain]}
        assert held and not (held & train) and not (valid & train) and not (held & valid)
        assert all(d.eligible for d in split.heldout[domain])
