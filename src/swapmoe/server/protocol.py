"""Request bodies of the OpenAI API subset that ``swapmoe serve`` implements, validated strictly.

Strict means: wrong JSON types are errors (``"max_tokens": "5"`` is not 5), NaN and infinities are
errors, and a field this server does not know is an error naming that field (as OpenAI answers
"Unrecognized request argument"). Known OpenAI fields that swapmoe cannot honour are accepted only
at their neutral value (``n=1``, ``best_of=1``, penalties 0, empty ``logit_bias``, no tools), so a
client that sends defaults works and a client that asks for something else learns why it cannot.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# OpenAI documents at most 5 (completions) and 20 (chat) alternatives per token; 20 for both here.
MAX_LOGPROBS = 20
# OpenAI allows 4 stop strings; more are harmless, but the list must stay small (each is searched
# for in the text after every token).
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
# Prompts of one /v1/completions request (run one after the other; lm-evaluation-harness batches).
MAX_PROMPTS = 64

_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def check_text(value: str) -> str:
    """Reject strings that cannot be UTF-8 (JSON can carry unpaired surrogates like ``\\ud800``)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (it contains an unpaired surrogate)") from None
    return value


def _check_stop(stop: str | list[str] | None) -> str | list[str] | None:
    stops = [stop] if isinstance(stop, str) else (stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
    for s in stops:
        check_text(s)
        if len(s) > MAX_STOP_LENGTH:
            raise ValueError(f"a stop string may be at most {MAX_STOP_LENGTH} characters long")
    return stop


def stop_list(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else (stop or [])
    return tuple(s for s in stops if s)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


NonNegInt = Annotated[int, Field(ge=0)]


class _Common(BaseModel):
    """Fields shared by both endpoints."""

    model_config = _STRICT

    model: str | None = None  # None: the served model (OpenAI requires it; curl users forget it)
    max_tokens: NonNegInt | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        return _check_stop(v)

    @field_validator("n")
    @classmethod
    def _n(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("only n=1 is supported (generation runs at batch 1)")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("penalties are not supported; leave them out or set them to 0")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported; leave it out or send {}")
        return v


TokenIds = Annotated[list[NonNegInt], Field(min_length=1)]


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: str | TokenIds | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] | Annotated[
        list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)
    ]
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        for p in [v] if isinstance(v, str) else v:
            if isinstance(p, str):
                check_text(p)
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("only best_of=1 is supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix (insertion) is not supported")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        return check_text(v)


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)  # tool_calls etc. pass on

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[TextPart] | None) -> str | list[TextPart] | None:
        return check_text(v) if isinstance(v, str) else v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: NonNegInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools (function calling) are not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
