"""Locality statistics with literal routing, and `swapmoe trace` end to end."""

import json

import torch

from swapmoe.cli import main
from swapmoe.evaluation.trace import (
    activation_counts,
    belady_hit_rate,
    lru_hit_rate,
    token_repeat,
    window_repeat,
)
from tests.engine.tiny import build_checkpoint


def test_belady_is_optimal_on_a_hand_checked_sequence():
    # S=2: 1m 2m 1h 3m(evict 2, used last) 1h 2m(evict 3 or 1: neither reused) -> 2 hits of 6
    assert belady_hit_rate([1, 2, 1, 3, 1, 2], 2) == 2 / 6
    assert lru_hit_rate([1, 2, 1, 3, 1, 2], 2) == 2 / 6
    # a cyclic pattern one larger than the cache: LRU never hits, the ideal cache still does
    seq = [1, 2, 3] * 4
    assert lru_hit_rate(seq, 2) == 0.0
    assert belady_hit_rate(seq, 2) > 0.3
    assert belady_hit_rate(seq, 3) == 9 / 12  # all hits after the three cold misses


def test_activation_counts_and_repeats():
    idx = torch.tensor([[0, 1], [0, 1], [2, 0], [2, 0]])  # 4 tokens, top-2 of 4 experts
    counts = activation_counts(idx, num_experts=4, window=2)
    assert counts.tolist() == [[2, 2, 0, 0], [2, 0, 2, 0]]
    assert window_repeat(counts, k=2) == 0.5  # {0,1} then {0,2}: one of two kept
    # token 2 shares 2/2 with token 1, token 3 shares 1/2 (expert 0), token 4 shares 2/2
    assert abs(token_repeat(idx) - (1 + 0.5 + 1) / 3) < 1e-6


def test_trace_command_writes_heatmap_and_stats(tmp_path):
    ckpt = build_checkpoint(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    assert main(["trace", str(ckpt), "--text", str(text), "--out", str(tmp_path / "tr"), "--heat-window", "8",
                 "--window", "32"]) == 0
    assert (tmp_path / "tr" / "expert_heatmap.png").stat().st_size > 1000
    record = json.loads((tmp_path / "tr" / "locality.json").read_text())
    assert set(record["provenance"]) >= {"torch", "transformers", "device", "git_commit"}
    for layer in record["layers"].values():
        ideal = {int(k): v for k, v in layer["ideal_cache_hit_rate"].items()}
        lru = {int(k): v for k, v in layer["lru_cache_hit_rate"].items()}
        assert all(ideal[s] >= lru[s] - 1e-9 for s in ideal)  # no policy beats the ideal cache
        assert ideal[layer["experts"]] > 0.9  # every expert resident: only cold misses
    assert main(["trace", str(ckpt), "--text", str(text), "--layers", "7", "--out", str(tmp_path / "x")]) == 2
