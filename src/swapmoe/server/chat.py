"""Turning chat messages into prompt tokens: the tokenizer's chat template, or a plain fallback.

With a chat template (``tokenizer.chat_template``) the conversation is rendered by
``apply_chat_template(..., add_generation_prompt=True)`` and tokenised without adding special tokens
(templates write their own BOS). A model without one (many base models) gets the fallback::

    System: <system text>
    User: <user text>
    Assistant: <assistant text>
    User: <user text>
    Assistant:

one line per message (``developer`` counts as System, ``tool`` as Tool), tokenised like a completion
prompt (with the tokenizer's special tokens), and generation also stops at ``"\\nUser:"`` so that a
base model does not write the user's next turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from swapmoe.server.errors import APIError
from swapmoe.server.protocol import ChatMessage

FALLBACK_STOP = "\nUser:"


@dataclass(frozen=True)
class ChatPrompt:
    token_ids: list[int]
    extra_stops: tuple[str, ...]  # stop strings implied by the format


def _as_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        d = m.model_dump(exclude_none=True)
        d["role"] = "system" if m.role == "developer" else m.role
        d["content"] = m.text()
        out.append(d)
    return out


def fallback_text(messages: list[ChatMessage]) -> str:
    names = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
    lines = [f"{names[m.role]}: {m.text()}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def chat_prompt(tokenizer: Any, messages: list[ChatMessage], check: Callable[[str], None] | None = None) -> ChatPrompt:
    """Prompt token ids for ``messages`` (raises :class:`APIError` 400 when the template refuses).

    ``check(text)`` sees the rendered text before it is tokenised (the server's byte-length check).
    """
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(_as_dicts(messages), tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja's raise_exception (e.g. "roles must alternate") and template bugs
            raise APIError(400, f"the model's chat template rejected the messages: {e}", param="messages") from None
        if check is not None:
            check(text)
        return ChatPrompt(list(tokenizer(text, add_special_tokens=False).input_ids), ())
    text = fallback_text(messages)
    if check is not None:
        check(text)
    return ChatPrompt(list(tokenizer(text).input_ids), (FALLBACK_STOP,))
