"""Reproducible answers within a budget: hold the resident set fixed after a warm-up, or start every
request from the state the warm-up left.

With Masked Gating a request's output depends on which experts are resident, and by default
(``adaptive``) SwapMoE moves the resident set toward the experts the text being served needs, so the
same request can come out differently after other requests have moved experts. In ``fixed`` mode the
set still adapts during a warm-up (a text run through the model at start-up, and/or the first N
tokens served), and is then held: ``swaps_per_update=0``, copies in flight finished first. From then
on the same request with the same seed gives the same output, whatever else was served. In ``reset``
mode the set keeps adapting *within* each request, but every request starts from the state the
warm-up left (resident sets, importance, update counters: ``model.swapmoe.snapshot()`` once, then
``restore()`` before each request), so the same request again gives the same output; the price is
copying back, before each request, the experts the previous one brought in.

Only the public runtime API of ``model.swapmoe`` is used (``set_updates``, ``synchronize``,
``resident_sets``, ``reset_stats``, ``snapshot``, ``restore``). All calls that touch the model run on
the engine thread, between requests.
"""

from __future__ import annotations

import logging
from typing import Any

from swapmoe.engine.generate import context_length, prefill

logger = logging.getLogger("swapmoe.server")

MODES = ("adaptive", "fixed", "reset")


class ResidentSetControl:
    """The ``--resident-set`` policy of one server.

    mode           "adaptive" (SwapMoE's default: the set follows the text served), "fixed" (held after
                   the warm-up) or "reset" (each request starts from the state after the warm-up)
    warmup_tokens  with "fixed" or "reset": tokens served (prompts and generated) before the set is held
                   (the state to reset to is taken)
    warmup_text    text run through the model at start-up (both modes), so the first requests are
                   served by a set already fitted to this kind of text
    """

    def __init__(self, model: Any, tokenizer: Any, mode: str = "adaptive", warmup_tokens: int = 0,
                 warmup_text: str | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"resident_set must be one of {MODES}, got {mode!r}")
        if warmup_tokens < 0:
            raise ValueError("warmup_tokens must be >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.runtime = getattr(model, "swapmoe", None)
        self.mode = mode
        self.tokens_left = warmup_tokens
        self.warmup_text = warmup_text
        self.fixed = False
        self.fixed_sets: list[list[int]] | None = None  # the held set per MoE layer
        self.start_state: Any = None  # "reset": the runtime snapshot every request starts from

    @property
    def state(self) -> str:
        """"adaptive", "warming up" (fixed mode before the set is held) or "fixed"."""
        if self.mode == "adaptive":
            return "adaptive"
        if not self.fixed:
            return "warming up"
        return "fixed" if self.mode == "fixed" else "reset per request"

    # ----------------------------------------------------- engine-thread jobs
    def start(self, ctx: Any = None) -> None:
        """Start-up job: run the warm-up text, then hold the set when nothing else is to be served first."""
        if self.warmup_text:
            tokens = self._run_text(self.warmup_text)
            if self.runtime is not None:
                self.runtime.reset_stats()  # the counters describe what is served, not the warm-up
            logger.info("resident set warmed up on %d tokens of text", tokens)
        if self.mode != "adaptive" and self.tokens_left == 0:
            self._hold()

    def before_request(self) -> None:
        """Called on the engine thread before every request: in "reset" mode, back to the start state."""
        if self.start_state is not None and self.runtime is not None:
            self.runtime.restore(self.start_state)

    def after_request(self, tokens: int) -> None:
        """Called on the engine thread after every request with the tokens it put through the model."""
        if self.mode == "adaptive" or self.fixed:
            return
        self.tokens_left -= tokens
        if self.tokens_left <= 0:
            self._hold()

    # ---------------------------------------------------------------- helpers
    def _run_text(self, text: str) -> int:
        """Put ``text`` through the model in windows of the context length (updates on); its token count."""
        ids = list(self.tokenizer(text).input_ids)
        window = context_length(self.model) or 2048
        for start in range(0, len(ids), window):
            prefill(self.model, ids[start:start + window])
        return len(ids)

    def _hold(self) -> None:
        if self.runtime is not None and self.mode == "fixed":
            self.runtime.set_updates(swaps_per_update=0)
            self.runtime.synchronize()  # a copy in flight would change the set after this point
            self.fixed_sets = self.runtime.resident_sets()
        elif self.runtime is not None:
            self.start_state = self.runtime.snapshot()
            self.fixed_sets = self.runtime.resident_sets()
        self.fixed = True
        logger.info("resident set %s from now on: the same request gives the same answer",
                    "held fixed" if self.mode == "fixed" else "reset before every request")
