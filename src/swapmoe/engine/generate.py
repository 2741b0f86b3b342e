"""Batch-1 generation in three layers, as in mlx-lm: step -> stream -> whole.

* :func:`prefill` / :func:`step`: one forward pass through the model's
  :class:`~swapmoe.engine.decoder.Decoder` (on CUDA a decode step is one CUDA graph replay).
* :func:`stream_generate` (or :func:`stream_from_prefill`): a generator of :class:`TokenEvent`,
  one per sampled token, applying sampling, stop tokens, stop strings, incremental detokenisation,
  log-probabilities, cancellation and a deadline.
* :func:`generate`: runs the stream to completion.

The engine works on any transformers causal LM (a model from ``swapmoe.load`` is one); it knows
nothing of HTTP, so it can be used and tested without the server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from swapmoe.engine.decoder import Decoder, context_length, decoder_for
from swapmoe.engine.detokenize import IncrementalDetokenizer
from swapmoe.engine.sampling import SamplingParams, make_generator, sample_token, top_logprobs
from swapmoe.engine.stops import StopStringMatcher

# T = tokens of the current forward, V = vocabulary size

FINISH_STOP = "stop"  # a stop token or stop string
FINISH_LENGTH = "length"  # max_tokens or the context length
FINISH_CANCELLED = "cancelled"  # the cancel event was set (e.g. the client went away)
FINISH_TIMEOUT = "timeout"  # the deadline passed


@dataclass(frozen=True)
class TokenEvent:
    """One step of a stream.

    ``text`` is the text released by this step: it can be "" (a partial character or a possible stop
    string is being held back) and can contain text of earlier tokens. ``token_id`` is None only for
    a final event that samples nothing (max_tokens=0, cancellation, timeout). Exactly the last event
    of a stream has ``finish_reason`` set. ``is_stop_token`` marks an end-of-sequence token, whose
    text is never part of the output.
    """

    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    is_stop_token: bool = False


@dataclass(frozen=True)
class PromptScores:
    """Log-probabilities of the prompt's own tokens (the first token has none: nothing precedes it)."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


@dataclass
class Prefill:
    """State after the prompt's forward pass: the decoder holding the sequence, the next-token logits
    ``[V]`` (host, float32) and the prompt's scores."""

    decoder: Decoder
    next_logits: torch.Tensor
    scores: PromptScores | None = None


@dataclass
class GenerationResult:
    """A whole generation (see :func:`generate`)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


def stop_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config (which may list several)."""
    ids: set[int] = set()
    candidates: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        candidates.append(getattr(generation_config, "eos_token_id", None))
    for candidate in candidates:
        if isinstance(candidate, int):
            ids.add(candidate)
        elif isinstance(candidate, Iterable) and not isinstance(candidate, str):
            ids.update(int(i) for i in candidate)
    return frozenset(ids)


def step(state: Prefill, token: int) -> torch.Tensor:
    """Feed ``token`` after the sequence ``state`` holds; return the next-token logits ``[V]`` (CPU float32).

    CPU float32 logits make sampling independent of device and dtype (see sampling.py).
    """
    dec = state.decoder
    return dec.read_logits(dec.step(token))


def prefill(
    model: Any, prompt_ids: Sequence[int], *, score_top_k: int | None = None, max_new_tokens: int | None = None
) -> Prefill:
    """Run the prompt through the model in one forward pass.

    ``max_new_tokens`` sizes the decode cache (a static cache on CUDA); more tokens still work (the
    sequence is re-prefilled into a larger cache), fewer waste memory. With ``score_top_k`` set, the
    same pass also scores the prompt (each token's log-probability given the tokens before it, plus
    the ``score_top_k`` best alternatives): this is what ``echo`` with ``logprobs`` needs, and costs
    no extra forward.
    """
    if not prompt_ids:
        raise ValueError("the prompt must contain at least one token")
    dec = decoder_for(model)
    room = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    if score_top_k is None:
        logits = dec.prefill(list(prompt_ids), **room)  # [V] on the device
        return Prefill(dec, dec.read_logits(logits))
    logits = dec.prefill(list(prompt_ids), all_logits=True, **room).cpu()  # [T, V]
    logprobs = torch.log_softmax(logits[:-1], dim=-1)  # [T-1, V]: row i predicts token i+1
    targets = torch.tensor(list(prompt_ids[1:]), dtype=torch.long)  # [T-1]
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()  # [T-1]
    tops: list[list[tuple[int, float]] | None] = [None]
    tops += [top_logprobs(row, score_top_k) for row in logprobs]
    scores = PromptScores(list(prompt_ids), [None, *chosen], tops)
    return Prefill(dec, logits[-1], scores)


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def stream_from_prefill(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    state: Prefill,
    params: SamplingParams,
    *,
    cancel: threading.Event | None = None,
    deadline: float | None = None,
    stop_ids: frozenset[int] | None = None,
) -> Iterator[TokenEvent]:
    """Generate after :func:`prefill`; see :class:`TokenEvent` for what is yielded.

    ``cancel`` and ``deadline`` (a ``time.monotonic()`` value) are checked before every token, so a
    cancelled request costs at most one more forward pass.
    """
    stop_ids = stop_token_ids(model, tokenizer) if stop_ids is None else stop_ids
    max_len = context_length(model)
    generator = make_generator(params.seed)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    matcher = StopStringMatcher(params.stop)

    def finish_text() -> tuple[str, bool]:
        text, stopped = matcher.feed(detokenizer.flush())
        return (text, True) if stopped else (text + matcher.flush(), False)

    if params.max_tokens <= 0:
        yield TokenEvent(None, "", finish_reason=FINISH_LENGTH)
        return
    logits = state.next_logits
    produced = 0
    while True:
        if cancel is not None and cancel.is_set():
            yield TokenEvent(None, "", finish_reason=FINISH_CANCELLED)
            return
        if _expired(deadline):
            yield TokenEvent(None, "", finish_reason=FINISH_TIMEOUT)
            return
        token = sample_token(logits, params.temperature, params.top_p, generator)
        logprob: float | None = None
        alternatives: list[tuple[int, float]] | None = None
        if params.logprobs is not None:
            row = torch.log_softmax(logits, dim=-1)  # [V], the model's own distribution
            logprob = float(row[token])
            alternatives = top_logprobs(row, params.logprobs)
        produced += 1
        if token in stop_ids:
            text, _ = finish_text()
            yield TokenEvent(token, text, logprob, alternatives, FINISH_STOP, is_stop_token=True)
            return
        text, stopped = matcher.feed(detokenizer.add(token))
        if stopped:
            yield TokenEvent(token, text, logprob, alternatives, FINISH_STOP)
            return
        if produced >= params.max_tokens or (max_len is not None and len(prompt_ids) + produced >= max_len):
            tail, stopped = finish_text()
            reason = FINISH_STOP if stopped else FINISH_LENGTH
            yield TokenEvent(token, text + tail, logprob, alternatives, reason)
            return
        yield TokenEvent(token, text, logprob, alternatives)
        logits = step(state, token)


def stream_generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    cancel: threading.Event | None = None,
    deadline: float | None = None,
) -> Iterator[TokenEvent]:
    """Prefill ``prompt_ids`` and stream tokens (see :func:`stream_from_prefill`)."""
    state = prefill(model, prompt_ids, max_new_tokens=params.max_tokens)
    yield from stream_from_prefill(model, tokenizer, prompt_ids, state, params, cancel=cancel, deadline=deadline)


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int],
    params: SamplingParams | None = None,
    *,
    cancel: threading.Event | None = None,
    deadline: float | None = None,
) -> GenerationResult:
    """Generate to completion. A string prompt is tokenised with the tokenizer's special tokens."""
    params = params or SamplingParams()
    prompt_ids = tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
    result = GenerationResult("", [], FINISH_LENGTH, len(prompt_ids))
    pieces: list[str] = []
    for event in stream_generate(model, tokenizer, prompt_ids, params, cancel=cancel, deadline=deadline):
        pieces.append(event.text)
        if event.token_id is not None:
            result.token_ids.append(event.token_id)
            if event.logprob is not None:
                result.logprobs.append(event.logprob)
                result.top_logprobs.append(event.top_logprobs or [])
        if event.finish_reason is not None:
            result.finish_reason = event.finish_reason
    result.text = "".join(pieces)
    return result
