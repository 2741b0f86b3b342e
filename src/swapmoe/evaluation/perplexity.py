"""Perplexity of one continuous token stream, read in order in fixed windows at batch 1.

This is how a served model meets text: one request after another, never shuffled, so whatever
the Virtual Experts runtime learned from one window (importance, the resident set) carries over
to the next. The stream ``ids[0..N)`` is cut into windows of ``window + 1`` tokens that overlap by
one token: window ``w`` feeds ``ids[w*W : w*W + W]`` and scores the next token at every position,
so every token but the first is scored exactly once, with the context of its own window only
(no KV cache crosses a window boundary). The last window may be shorter.

    N = tokens in the stream, W = window, V = vocabulary
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from swapmoe.families import require_causal_lm


@dataclass(frozen=True)
class PerplexityResult:
    """What :func:`stream_perplexity` measured (counters are this call's, not the model's lifetime)."""

    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, nats
    tokens: int  # tokens scored (N - 1)
    windows: int
    window: int
    seconds: float
    hit_rate: float | None  # share of the router's top-k choices that were resident; None: no swapmoe runtime
    swaps: int | None
    bytes_copied: int | None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def windows(num_tokens: int, window: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each window's *inputs*; its targets are ``[start + 1, end + 1)``.

    >>> list(windows(10, 4))
    [(0, 4), (4, 8), (8, 9)]
    """
    if window < 1:
        raise ValueError("window must be >= 1")
    for start in range(0, max(num_tokens - 1, 0), window):
        yield start, min(start + window, num_tokens - 1)


def runtime_counters(model: Any) -> tuple[int, int, int, int] | None:
    """(hits, lookups, swaps, bytes copied) so far, or None for a model without a swapmoe runtime."""
    runtime = getattr(model, "swapmoe", None)
    if runtime is None:
        return None
    total = runtime.stats()["total"]
    return total["hits"], total["lookups"], total["swaps"], total["bytes_copied"]


@torch.inference_mode()
def stream_perplexity(
    model: Any,
    token_ids: Sequence[int] | torch.Tensor,
    window: int = 512,
    progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``token_ids`` read as one stream in fixed windows (batch 1, in order).

    ``model`` is a causal LM returning ``.logits`` (a swapmoe-loaded model, or any transformers
    model). ``progress`` is called after each window with the number of tokens it scored. With a
    swapmoe model, hit rate, swaps and bytes copied are this call's share of the runtime's counters.
    """
    require_causal_lm(model, "perplexity of a text stream")
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)  # [N]
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens to score one")
    device = next(model.parameters()).device
    ids = ids.to(device)
    before = runtime_counters(model)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    scored = 0
    count = 0
    start_time = time.perf_counter()
    for start, end in windows(ids.numel(), window):
        inputs = ids[start:end].unsqueeze(0)  # [1, W]
        targets = ids[start + 1 : end + 1]  # [W]
        logits = model(input_ids=inputs, use_cache=False).logits[0]  # [W, V]
        nll_sum += F.cross_entropy(logits.float(), targets, reduction="sum").double()
        scored += targets.numel()
        count += 1
        if progress is not None:
            progress(targets.numel())
    nll = float(nll_sum.item()) / scored
    seconds = time.perf_counter() - start_time
    after = runtime_counters(model)
    hit_rate = swaps = copied = None
    if before is not None and after is not None:
        hits, lookups = after[0] - before[0], after[1] - before[1]
        hit_rate = hits / lookups if lookups else None
        swaps, copied = after[2] - before[2], after[3] - before[3]
    return PerplexityResult(
        perplexity=math.exp(nll), nll=nll, tokens=scored, windows=count, window=window, seconds=seconds,
        hit_rate=hit_rate, swaps=swaps, bytes_copied=copied,
    )


def tokenize_text(tokenizer: Any, text: str, max_tokens: int | None = None) -> list[int]:
    """The whole text as one token stream (no special tokens added), cut to ``max_tokens``."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return ids[:max_tokens] if max_tokens is not None else ids
