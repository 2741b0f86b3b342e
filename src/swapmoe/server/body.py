"""From request bytes to a validated request object, and the cheap checks that come before tokenising.

Everything here is synchronous CPU work that grows with the request (UTF-8 decoding, JSON parsing,
schema validation, the walk over every string), so :mod:`swapmoe.server.app` runs it on a worker
thread, never on the event loop. :class:`PromptBytes` bounds the tokens a text can have from its byte
length alone, so a prompt that cannot fit the context is refused before it is tokenised.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError

from swapmoe.server.errors import APIError, from_validation_error

# Python refuses to convert integer literals longer than this (sys.int_info.default_max_str_digits):
# json.loads would raise a bare ValueError. Such a literal is answered as a 400 naming its field.
MAX_INT_DIGITS = 4300


class _HugeInt:
    """Stands in for an integer literal with more than MAX_INT_DIGITS digits (never converted)."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _parse_int(literal: str) -> int | _HugeInt:
    digits = len(literal) - literal.startswith("-")
    return _HugeInt(digits) if digits > MAX_INT_DIGITS else int(literal)


def _first_problem(value: Any, path: str = "") -> tuple[str, str] | None:
    """(path, problem) of the first value in parsed JSON that no field can take, else None.

    Two kinds: a string (or key) that UTF-8 cannot encode (JSON escapes can carry lone surrogates such
    as ``"\\ud800"``, which would fail later in the tokenizer or when the answer is encoded), and an
    integer literal too long to convert.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path, "text is not valid Unicode (an unpaired surrogate such as \\ud800)"
        return None
    if isinstance(value, _HugeInt):
        return path, f"an integer of {value.digits} digits is out of range (at most {MAX_INT_DIGITS} digits)"
    if isinstance(value, dict):
        for key, item in value.items():
            found = _first_problem(key, path)
            found = found if found is not None else _first_problem(item, f"{path}.{key}" if path else key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _first_problem(item, f"{path}.{i}")
            if found is not None:
                return found
    return None


def parse_body(raw: bytes, schema: type[BaseModel]) -> Any:
    """``raw`` as a ``schema`` instance, or an :class:`APIError` 400 saying what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (byte {e.start})", code="invalid_utf8") from None
    try:
        data = json.loads(text, parse_int=_parse_int)
    except (json.JSONDecodeError, RecursionError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    del text
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    found = _first_problem(data)
    if found is not None:
        where, problem = found
        code = "invalid_unicode" if problem.startswith("text") else "integer_out_of_range"
        raise APIError(400, f"{where or 'a key'}: {problem}", param=where or None, code=code)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None


def is_json_media_type(content_type: str | None) -> bool:
    """``application/json`` or ``application/<something>+json``, parameters (charset) aside."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


# Normalizers of the tokenizers library by how much they can shrink a text's UTF-8 bytes. Unicode
# normalisation and lower-casing shrink at most threefold (Hangul jamo L+V+T compose to one syllable;
# KELVIN SIGN, 3 bytes, becomes "k"); Prepend and a string Replace that is not shorter only grow.
_NORMALIZER_SHRINK = {"NFC": 3, "NFD": 3, "NFKC": 3, "NFKD": 3, "Lowercase": 3, "Prepend": 1}
# Pre-tokenizers that keep every byte of the text (others, such as Whitespace, drop text).
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "Split"}


def _normalizer_shrink(spec: dict[str, Any] | None) -> int | None:
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1
        for part in spec.get("normalizers", []):
            f = _normalizer_shrink(part)
            if f is None:
                return None
            factor *= f
        return factor
    if kind == "Replace":
        pattern = spec.get("pattern", {})
        if "String" in pattern and len(spec.get("content", "").encode()) >= len(pattern["String"].encode()):
            return 1
        return None
    return _NORMALIZER_SHRINK.get(kind)


def _keeps_text(spec: dict[str, Any] | None) -> bool:
    if spec is None:
        return True
    if spec.get("type") == "Sequence":
        return all(_keeps_text(p) for p in spec.get("pretokenizers", []))
    if spec.get("type") == "Split" and spec.get("behavior") == "Removed":
        return False
    return spec.get("type") in _KEEPING_PRE_TOKENIZERS


class PromptBytes:
    """A lower bound on a text's token count from its UTF-8 length: ``bytes // bytes_per_token``.

    ``bytes_per_token`` is the most text one token can stand for: the longest entry of the vocabulary
    (in UTF-8 bytes, as written there: a byte-level BPE writes one character per byte, SentencePiece
    writes pieces as text, so the written form is never shorter than the text it decodes to), times
    how much the tokenizer's normalizer can shrink a text. It is None, and the check is off, when
    that bound does not hold: a tokenizer that is not a ``tokenizers`` BPE, one that maps an unknown
    run of text to a single token, or one whose normalizer or pre-tokenizer can drop text.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.bytes_per_token = self._bound(tokenizer)

    @staticmethod
    def _bound(tokenizer: Any) -> int | None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        try:
            spec = json.loads(backend.to_str())
        except Exception:  # an unusual tokenizer: no bound, no early refusal
            return None
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            return None
        vocab = tokenizer.get_vocab()
        if model.get("unk_token") is not None:
            if model.get("fuse_unk") and not model.get("byte_fallback"):
                return None  # a run of unknown characters becomes one token
        elif not model.get("byte_fallback"):
            # without an unknown token, a character outside the vocabulary is dropped: only a
            # byte-level vocabulary with all 256 byte characters is sure to keep every byte
            from tokenizers.pre_tokenizers import ByteLevel

            if "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")) or any(
                    c not in vocab for c in ByteLevel.alphabet()):
                return None
        shrink = _normalizer_shrink(spec.get("normalizer"))
        if shrink is None or not _keeps_text(spec.get("pre_tokenizer")):
            return None
        longest = max((len(t.encode("utf-8")) for t in vocab), default=0)
        return max(longest, 4) * shrink  # 4: an unknown character becomes at most one token

    def min_tokens(self, text: str) -> int:
        """Fewest tokens ``text`` can encode to (0 when no bound is known)."""
        if self.bytes_per_token is None:
            return 0
        n = len(text)  # a character is at least one byte: no encoding needed for short texts
        if n // self.bytes_per_token == 0:
            return 0
        return len(text.encode("utf-8", "surrogatepass")) // self.bytes_per_token
