"""Per-endpoint rendering: engine events -> stream chunks, and finished choices -> one response body.

:class:`CompletionRenderer` (``/v1/completions``) and :class:`ChatRenderer` (``/v1/chat/completions``)
share one interface, so the streaming and collecting code in :mod:`swapmoe.server.app` is written
once for both.
"""

from __future__ import annotations

from typing import Any

from swapmoe.server.responses import (
    FINISH_FOR_CLIENT,
    ChoiceState,
    ResponseHeader,
    TokenStrings,
    chat_logprobs,
    completion_logprobs,
    logprob_entry,
    prompt_entries,
    usage,
)
from swapmoe.server.runner import PromptDone, TokenOut


class CompletionRenderer:
    """``text_completion`` objects; ``echo_texts`` (one per prompt) when the request echoes."""

    def __init__(self, model: str, strings: TokenStrings, *, logprobs: bool, echo_texts: list[str] | None,
                 include_usage: bool) -> None:
        self.header = ResponseHeader("text_completion", model)
        self.strings = strings
        self.logprobs = logprobs
        self.echo_texts = echo_texts
        self.include_usage = include_usage
        self._offsets: dict[int, int] = {}

    def _choice(self, index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    # ------------------------------------------------------------ streaming
    def on_prompt(self, ev: PromptDone) -> list[dict[str, Any]]:
        self._offsets[ev.index] = 0
        if self.echo_texts is None:
            return []
        text = self.echo_texts[ev.index]
        lp = None
        if self.logprobs and ev.scores is not None:
            lp, self._offsets[ev.index] = completion_logprobs(prompt_entries(ev.scores), self.strings, 0)
        else:
            self._offsets[ev.index] = len(text)
        return [self.header.wrap([self._choice(ev.index, text, lp, None)])]

    def on_token(self, ev: TokenOut) -> list[dict[str, Any]]:
        event = ev.event
        finish = FINISH_FOR_CLIENT.get(event.finish_reason or "")
        entry = logprob_entry(event) if self.logprobs else None
        if not event.text and entry is None and finish is None:
            return []
        lp = None
        if self.logprobs:
            lp, self._offsets[ev.index] = completion_logprobs([entry] if entry else [], self.strings,
                                                              self._offsets.get(ev.index, 0))
        return [self.header.wrap([self._choice(ev.index, event.text, lp, finish)])]

    def on_end(self, prompt_tokens: int, completion_tokens: int) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        return [self.header.wrap([], usage=usage(prompt_tokens, completion_tokens))]

    # ----------------------------------------------------------- collecting
    def response(self, choices: list[ChoiceState], prompt_tokens: int) -> dict[str, Any]:
        out = []
        for c in choices:
            prefix = self.echo_texts[c.index] if self.echo_texts is not None else ""
            lp = None
            if self.logprobs:
                entries = (c.prompt_entries or []) + c.entries
                lp, _ = completion_logprobs(entries, self.strings, 0 if c.prompt_entries else len(prefix))
            out.append(self._choice(c.index, prefix + "".join(c.text), lp, c.finish_reason))
        completion_tokens = sum(c.completion_tokens for c in choices)
        return self.header.wrap(out, usage=usage(prompt_tokens, completion_tokens))


class ChatRenderer:
    """``chat.completion`` objects and ``chat.completion.chunk`` deltas."""

    def __init__(self, model: str, strings: TokenStrings, *, logprobs: bool, include_usage: bool) -> None:
        self.header = ResponseHeader("chat.completion.chunk", model)
        self.strings = strings
        self.logprobs = logprobs
        self.include_usage = include_usage

    def _chunk(self, delta: dict[str, Any], logprobs: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
        return self.header.wrap([{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])

    def on_prompt(self, ev: PromptDone) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""}, None, None)]

    def on_token(self, ev: TokenOut) -> list[dict[str, Any]]:
        event = ev.event
        finish = FINISH_FOR_CLIENT.get(event.finish_reason or "")
        entry = logprob_entry(event) if self.logprobs else None
        if not event.text and entry is None and finish is None:
            return []
        lp = chat_logprobs([entry], self.strings) if entry is not None else None
        return [self._chunk({"content": event.text} if event.text or entry else {}, lp, finish)]

    def on_end(self, prompt_tokens: int, completion_tokens: int) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        return [self.header.wrap([], usage=usage(prompt_tokens, completion_tokens))]

    def response(self, choices: list[ChoiceState], prompt_tokens: int) -> dict[str, Any]:
        (c,) = choices
        message = {"role": "assistant", "content": "".join(c.text)}
        lp = chat_logprobs(c.entries, self.strings) if self.logprobs else None
        body = self.header.wrap([{"index": 0, "message": message, "logprobs": lp, "finish_reason": c.finish_reason}],
                                usage=usage(prompt_tokens, c.completion_tokens))
        body["object"] = "chat.completion"
        return body
