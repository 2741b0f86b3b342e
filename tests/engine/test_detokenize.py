"""Incremental detokenisation: the deltas add up to the full decoding, never half a character."""

from swapmoe.engine.detokenize import IncrementalDetokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé text, emoji 🙂 and CJK 漢字 are encoded as bytes.",
    "🙂🙂 漢字漢字 ööö",
]


def test_deltas_concatenate_to_the_decoded_text(tokenizer):
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        # a prompt of the first tokens (ending on a character boundary), then the rest generated
        splits = [k for k in range(1, len(ids)) if "\ufffd" not in tokenizer.decode(ids[:k])][:4]
        assert splits
        for split in splits:
            detok = IncrementalDetokenizer(tokenizer, ids[:split])
            deltas = [detok.add(i) for i in ids[split:]]
            deltas.append(detok.flush())
            assert "".join(deltas) == tokenizer.decode(ids[split:]) == text[len(tokenizer.decode(ids[:split])):]
            assert all("\ufffd" not in d for d in deltas), deltas


def test_multibyte_character_waits_for_its_last_byte(tokenizer):
    ids = tokenizer("🙂").input_ids
    assert len(ids) > 1  # the emoji is split over byte tokens
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "🙂"


def test_flush_releases_an_incomplete_character(tokenizer):
    ids = tokenizer("🙂").input_ids
    detok = IncrementalDetokenizer(tokenizer)
    detok.add(ids[0])
    assert detok.flush() == "\ufffd"
