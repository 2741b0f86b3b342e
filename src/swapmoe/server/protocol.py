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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1


def _check_stop(stop: Any) -> str | list[str] | None:
    if stop is None:
        return None
    if not isinstance(stop, str | list) or (isinstance(stop, list) and not all(isinstance(s, str) for s in stop)):
        raise ValueError("stop must be a string or a list of strings")
    stops = [stop] if isinstance(stop, str) else stop
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
    stop: Any = None  # a string or a list of strings: checked by _stop, with a message in those terms
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop", mode="plain")
    @classmethod
    def _stop(cls, v: Any) -> str | list[str] | None:
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


def _token_ids(value: list[Any], where: str = "") -> list[int]:
    """``value`` as token ids, or a ValueError in the user's terms (``where`` names one of several prompts)."""
    if not value:
        raise ValueError(f"{where or 'the prompt'} is an empty list of token ids")
    prefix = f"{where}: " if where else ""
    for i, t in enumerate(value):
        if not _is_int(t):
            raise ValueError(f"{prefix}item {i} is {_json_kind(t)}, not a token id (an integer)")
        if t < 0:
            raise ValueError(f"{prefix}token id {t} at position {i} is negative (token ids are >= 0)")
    return value


def _json_kind(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (str, "a string"), (int, "an integer"), (float, "a number"),
                       (list, "a list"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def check_prompt(value: Any) -> str | list[int] | list[str] | list[list[int]]:
    """The ``prompt`` field: a string, a list of token ids, a list of strings or a list of token-id lists.

    Written by hand rather than as a union of types: pydantic would report every branch of the union
    ("prompt.str: Input should be a valid string (and 5 more problem(s))") where the user needs one
    sentence about what is wrong (a negative token id, too many prompts).
    """
    shapes = "a string, a list of token ids, a list of strings or a list of token-id lists"
    if isinstance(value, str):
        return check_text(value)
    if not isinstance(value, list):
        raise ValueError(f"the prompt must be {shapes}; got {_json_kind(value)}")
    if not value:
        raise ValueError("the prompt is an empty list")
    if _is_int(value[0]):
        return _token_ids(value)
    if not isinstance(value[0], str | list):
        raise ValueError(f"the prompt must be {shapes}; its first item is {_json_kind(value[0])}")
    if len(value) > MAX_PROMPTS:
        raise ValueError(f"too many prompts: {len(value)}; the limit is {MAX_PROMPTS} per request")
    kind = type(value[0])
    for i, p in enumerate(value):
        if not isinstance(p, kind):
            raise ValueError(f"prompt {i} is {_json_kind(p)}: a list of prompts holds only strings or only "
                             "token-id lists")
        if isinstance(p, str):
            check_text(p)
        else:
            _token_ids(p, f"prompt {i}")
    return value


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: Any  # checked by check_prompt
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        return check_prompt(v)

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
        if _is_int(p[0]):
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


# Content part types of OpenAI's API that carry something other than text, in the user's terms.
_NOT_TEXT = {"image_url": "images are not supported (this server serves a text-only model)",
             "input_image": "images are not supported (this server serves a text-only model)",
             "input_audio": "audio is not supported (this server serves a text-only model)",
             "file": "files are not supported (this server serves a text-only model)"}


def check_content(value: Any) -> str | list[TextPart] | None:
    """A message's ``content``: a string, a list of text parts, or null (written by hand: see check_prompt)."""
    if value is None or isinstance(value, str):
        return value if value is None else check_text(value)
    if not isinstance(value, list):
        raise ValueError(f"content must be a string or a list of text parts; got {_json_kind(value)}")
    parts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict):
            raise ValueError(f"content part {i} is {_json_kind(part)}; a part is an object such as "
                             '{"type": "text", "text": "..."}')
        kind = part.get("type")
        if kind in _NOT_TEXT:
            raise ValueError(f"content part {i} has type {kind!r}: {_NOT_TEXT[kind]}; send text parts only")
        if kind != "text":
            raise ValueError(f"content part {i} has type {kind!r}; only 'text' parts are supported")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"content part {i}: a text part needs a string 'text'")
        extra = sorted(set(part) - {"type", "text"})
        if extra:
            raise ValueError(f"content part {i}: unrecognized field {extra[0]!r}")
        parts.append(TextPart(type="text", text=check_text(part["text"])))
    return parts


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)  # tool_calls etc. pass on

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None  # checked by check_content
    name: str | None = None

    @field_validator("content", mode="plain")
    @classmethod
    def _content(cls, v: Any) -> str | list[TextPart] | None:
        return check_content(v)

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
