"""Response bodies and stream chunks in the shapes OpenAI's API uses (plain dicts, JSON-ready).

Log-probabilities come in two shapes. ``/v1/completions`` uses the legacy one (``tokens``,
``token_logprobs``, ``top_logprobs`` as ``{token: logprob}`` dicts, ``text_offset``), which is what
lm-evaluation-harness reads: with ``echo`` the prompt's tokens come first, the very first of them with
``null`` (nothing precedes it). ``/v1/chat/completions`` uses ``{"content": [{token, logprob, bytes,
top_logprobs}]}``. A token's string is its own decoding, so a token holding part of a UTF-8 character
shows as U+FFFD. An end-of-sequence token is counted in ``usage`` but is not part of the text or of
the log-probabilities.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from swapmoe.engine.generate import FINISH_LENGTH, FINISH_STOP, FINISH_TIMEOUT, PromptScores, TokenEvent

# A generation the server stopped because it is shutting down (the engine saw a cancellation).
FINISH_SHUTDOWN = "shutdown"
# What a client sees for the engine's reasons: a time limit or a shutdown truncates like a length limit.
FINISH_FOR_CLIENT = {FINISH_STOP: "stop", FINISH_LENGTH: "length", FINISH_TIMEOUT: "length",
                     FINISH_SHUTDOWN: "length"}

LogprobEntry = tuple[int, "float | None", "list[tuple[int, float]] | None"]


# A log-probability of -inf (a token the model rules out) is not valid JSON; like vLLM, report it as
# this floor instead.
LOGPROB_FLOOR = -9999.0


def _finite(logprob: float | None) -> float | None:
    return None if logprob is None else max(logprob, LOGPROB_FLOOR)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class TokenStrings:
    """Token id -> its text, cached (the vocabulary bounds the cache)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            s = self._tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self._cache[token_id] = s
        return s


def logprob_entry(event: TokenEvent) -> LogprobEntry | None:
    """The entry a generated token contributes to the log-probabilities (None: it contributes none)."""
    if event.token_id is None or event.is_stop_token or event.logprob is None:
        return None
    return (event.token_id, event.logprob, event.top_logprobs or [])


def prompt_entries(scores: PromptScores) -> list[LogprobEntry]:
    return list(zip(scores.token_ids, scores.logprobs, scores.top_logprobs, strict=True))


def completion_logprobs(entries: list[LogprobEntry], strings: TokenStrings, offset: int
                        ) -> tuple[dict[str, Any], int]:
    """The legacy logprobs object for ``entries`` whose text starts at ``offset``; also the end offset."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token_id, logprob, alternatives in entries:
        s = strings(token_id)
        tokens.append(s)
        values.append(_finite(logprob))
        tops.append(None if alternatives is None else {strings(i): _finite(v) for i, v in alternatives})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset


def chat_logprobs(entries: list[LogprobEntry], strings: TokenStrings) -> dict[str, Any]:
    def one(token_id: int, logprob: float | None) -> dict[str, Any]:
        s = strings(token_id)
        return {"token": s, "logprob": _finite(logprob), "bytes": list(s.encode("utf-8"))}

    content = []
    for token_id, logprob, alternatives in entries:
        item = one(token_id, logprob)
        item["top_logprobs"] = [one(i, v) for i, v in alternatives or []]
        content.append(item)
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class ChoiceState:
    """What one prompt's generation has produced so far (non-streaming responses)."""

    index: int
    text: list[str] = field(default_factory=list)
    entries: list[LogprobEntry] = field(default_factory=list)
    prompt_entries: list[LogprobEntry] | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None

    def add(self, event: TokenEvent) -> None:
        self.text.append(event.text)
        if event.token_id is not None:
            self.completion_tokens += 1
        entry = logprob_entry(event)
        if entry is not None:
            self.entries.append(entry)
        if event.finish_reason is not None:
            self.finish_reason = FINISH_FOR_CLIENT.get(event.finish_reason, event.finish_reason)


@dataclass
class ResponseHeader:
    """``id``, ``created`` and ``model`` shared by a response and all of its chunks."""

    object: str
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            self.id = new_id("chatcmpl" if self.object.startswith("chat") else "cmpl")

    def wrap(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, **extra}
