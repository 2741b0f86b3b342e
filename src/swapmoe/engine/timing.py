"""The one decode timing: every command and benchmark that reports decode speed calls :func:`time_decode`.

A step is timed from feeding a token to having the next-token logits on the host (the transfer a
streamed token needs), through the model's :class:`~swapmoe.engine.decoder.Decoder`, so the figure
is what ``swapmoe generate``, the server and ``model.generate`` pay per token, in whichever mode
(CUDA graph or eager) they decode.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from swapmoe.engine.decoder import Decoder, decoder_for


@dataclass
class DecodeTiming:
    """Seconds of one prefill and of each timed decode step; the tokens that were fed."""

    prefill_s: float
    step_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def mean_s(self) -> float:
        return sum(self.step_s) / len(self.step_s) if self.step_s else float("nan")


def time_decode(
    model: Any,
    prompt_ids: Sequence[int],
    steps: int,
    *,
    feed: Sequence[int] | None = None,
    warmup: int = 0,
    decoder: Decoder | None = None,
    mode: str | None = None,
) -> DecodeTiming:
    """Prefill ``prompt_ids``, then ``warmup`` untimed and ``steps`` timed batch-1 decode steps.

    Greedy unless ``feed`` is given (then step ``i`` is fed ``feed[i]``, teacher-forced: a random-weight
    model decoding greedily soon repeats one token, which flatters hit rates). The first step after a
    prefill captures the graph on CUDA; pass ``warmup >= 1`` to leave it out of the timing.
    """
    if feed is not None and len(feed) < warmup + steps:
        raise ValueError(f"feed has {len(feed)} tokens; {warmup + steps} are needed")
    dec = decoder if decoder is not None else decoder_for(model, mode)
    t0 = time.perf_counter()
    row = dec.read_logits(dec.prefill(list(prompt_ids), max_new_tokens=warmup + steps + 1))  # [V]
    timing = DecodeTiming(prefill_s=time.perf_counter() - t0)
    for i in range(warmup + steps):
        token = int(feed[i]) if feed is not None else int(row.argmax())
        start = time.perf_counter()
        row = dec.read_logits(dec.step(token))
        if i >= warmup:
            timing.step_s.append(time.perf_counter() - start)
            timing.tokens.append(token)
    return timing
