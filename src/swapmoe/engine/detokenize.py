"""Incremental detokenisation that never emits half a character.

Byte-level BPE tokens can carry a fraction of a UTF-8 character (an emoji is often 2-4 tokens), and
SentencePiece tokenizers drop a leading space when a token is decoded on its own. Both are handled
the way text-generation-inference does: decode a short window that starts a few tokens back (so
spacing is decided with context), emit only what the window adds beyond the already-emitted part,
and wait while the decoded window ends in U+FFFD (an incomplete character).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Tokens of left context decoded with each new token: enough for tokenizers whose spacing of a token
# depends on its neighbours (SentencePiece "▁" handling), small enough to keep decoding O(1) per token.
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    ``context_ids`` (normally the prompt) are never emitted; they only give the first generated
    tokens their correct spacing.
    """

    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(context_ids)
        self._read_offset = len(self._ids)
        self._prefix_offset = max(0, self._read_offset - _CONTEXT_TOKENS)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the text that became complete (possibly "")."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT_CHAR):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Text still pending at the end of generation (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
