"""Stream perplexity: the windowing on a tiny model, and the bundled reference model against its card.

The reference checks load ``models/ref-moe`` through swapmoe on the CPU and score the first 4096
tokens of ``data/heldout/all.txt`` (the slice the model card reports as ``test_slice``). The card's
figure was computed on the GPU in float32 from the same bfloat16 weights, so the two differ only by
summation order: well under :data:`REL_TOL`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from swapmoe.evaluation import stream_perplexity, tokenize_text, windows
from tests.counting import recount_hits
from tests.tiny_models import build_model

REPO = Path(__file__).resolve().parents[2]
REF_MOE = REPO / "models" / "ref-moe"
REF_DENSE = REPO / "models" / "ref-dense"
HELDOUT = REPO / "data" / "heldout" / "all.txt"
REL_TOL = 1e-5  # relative tolerance against the card: measured gap 0.0001% (1e-6) on CPU in float32; 10x margin


# ------------------------------------------------------------------- windowing (tiny random model)
def test_windows_score_every_token_but_the_first_once():
    for n, w in [(10, 4), (9, 4), (2, 1), (5, 100), (17, 1)]:
        spans = list(windows(n, w))
        targets = [t for a, b in spans for t in range(a + 1, b + 1)]
        assert targets == list(range(1, n)), (n, w, spans)
        assert all(b - a <= w for a, b in spans)
    assert list(windows(1, 4)) == []
    with pytest.raises(ValueError):
        list(windows(10, 0))


def test_stream_perplexity_equals_per_window_cross_entropy():
    torch.manual_seed(0)
    model = build_model("qwen3_moe").eval()
    ids = torch.randint(0, model.config.vocab_size, (70,))
    seen: list[int] = []
    res = stream_perplexity(model, ids, window=16, progress=seen.append)
    assert (res.tokens, res.windows, res.window) == (69, 5, 16)
    assert seen == [16, 16, 16, 16, 5]
    nll = 0.0
    with torch.no_grad():
        for a in range(0, 69, 16):
            b = min(a + 16, 69)
            logits = model(input_ids=ids[a:b][None]).logits[0]
            nll += F.cross_entropy(logits.float(), ids[a + 1 : b + 1], reduction="sum").item()
    assert res.nll == pytest.approx(nll / 69, rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(nll / 69), rel=1e-6)
    assert res.hit_rate is None and res.swaps is None  # plain transformers model: no runtime counters


def test_one_window_over_the_whole_stream_is_the_ordinary_lm_loss():
    torch.manual_seed(1)
    model = build_model("qwen3_moe").eval()
    ids = torch.randint(0, model.config.vocab_size, (40,))
    res = stream_perplexity(model, ids, window=1000)
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss.item()
    assert res.windows == 1 and res.tokens == 39
    assert res.nll == pytest.approx(loss, rel=1e-5)


def test_counters_are_this_calls_share(tmp_path):
    from swapmoe.loader import load
    from tests.tiny_models import make_checkpoint

    path = make_checkpoint("qwen3_moe", tmp_path / "m")
    model = load(path, "50%", device="cpu", update_interval=4)
    ids = torch.randint(0, model.config.vocab_size, (65,), generator=torch.Generator().manual_seed(0))
    first = stream_perplexity(model, ids, window=16)
    total = model.swapmoe.stats()["total"]
    assert 0.0 < first.hit_rate <= 1.0
    assert first.swaps == total["swaps"] and first.bytes_copied == total["bytes_copied"]
    second = stream_perplexity(model, ids, window=16)  # the resident set carries over: counters restart
    after = model.swapmoe.stats()["total"]
    assert second.swaps == after["swaps"] - total["swaps"]
    lookups = after["lookups"] - total["lookups"]
    assert second.hit_rate == pytest.approx((after["hits"] - total["hits"]) / lookups)


# ------------------------------------------------------------------- the bundled reference model
needs_reference = pytest.mark.skipif(not (REF_MOE / "eval_results.json").is_file(),
                                     reason="models/ref-moe not present (run scripts/reference/train.py)")


def _card(model_dir: Path) -> dict:
    return json.loads((model_dir / "eval_results.json").read_text())["heldout"]["test_slice"]


@needs_reference
def test_reference_moe_perplexity_matches_model_card():
    from transformers import AutoTokenizer

    from swapmoe.loader import load

    card = _card(REF_MOE)
    tok = AutoTokenizer.from_pretrained(REF_MOE)
    ids = tokenize_text(tok, HELDOUT.read_text(encoding="utf-8"), card["first_tokens"])
    model = load(REF_MOE, "100%", device="cpu", dtype="float32")
    with recount_hits(model) as counted:
        res = stream_perplexity(model, ids, window=512)
    assert res.tokens == card["tokens"]
    assert res.perplexity == pytest.approx(card["perplexity"], rel=REL_TOL)
    assert res.swaps == 0  # every expert resident
    assert counted["lookups"] > 0 and res.hit_rate == counted["hits"] / counted["lookups"]


@needs_reference
def test_eval_ppl_command_on_reference_models(capsys):
    from swapmoe.cli import main

    common = ["--text", str(HELDOUT), "--max-tokens", "1024", "--device", "cpu", "--json"]
    assert main(["eval-ppl", "--memory-budget", "50%", *common]) == 0  # no model argument: ref-moe
    out = capsys.readouterr().out
    moe = json.loads(out.strip().splitlines()[-1])
    assert moe["moe"] and moe["tokens"] == 1023 and moe["windows"] == 2
    # the command reports what the library measures with the same settings, and half the experts cost
    # perplexity against the full model on the same tokens
    from transformers import AutoTokenizer

    from swapmoe.loader import load

    ids = tokenize_text(AutoTokenizer.from_pretrained(REF_MOE), HELDOUT.read_text(encoding="utf-8"), 1024)
    half = load(REF_MOE, "50%", device="cpu")
    with recount_hits(half) as counted:
        lib = stream_perplexity(half, ids, window=512)
    full = stream_perplexity(load(REF_MOE, "100%", device="cpu"), ids, window=512)
    assert moe["perplexity"] == pytest.approx(lib.perplexity, rel=1e-9)
    assert moe["hit_rate"] == pytest.approx(counted["hits"] / counted["lookups"], rel=1e-12)
    assert counted["hits"] < counted["lookups"]  # half the experts resident: some choices missed
    assert moe["perplexity"] > full.perplexity
    assert "perplexity" in out and "hit rate" in out and "swaps" in out
    if REF_DENSE.is_dir():
        assert main(["eval-ppl", str(REF_DENSE), *common]) == 0
        dense = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert not dense["moe"] and dense["hit_rate"] is None and dense["tokens"] == 1023
