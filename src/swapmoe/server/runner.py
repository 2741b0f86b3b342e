"""Running one HTTP request's generation on the engine worker and getting its events in asyncio.

The worker thread runs :func:`generation_job`; every event it produces crosses to the event loop
with ``loop.call_soon_threadsafe`` into an ``asyncio.Queue`` that :class:`RunningRequest` reads. The
events of one request arrive in order, followed by the end of the job (its result or exception).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from swapmoe.engine.generate import PromptScores, TokenEvent, prefill, stream_from_prefill
from swapmoe.engine.sampling import SamplingParams
from swapmoe.engine.worker import EngineWorker, Job, JobContext


class TimeLimitError(RuntimeError):
    """The request's time limit passed before all of its prompts had been run."""


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request, tokenised: what the engine needs and nothing of HTTP."""

    prompts: list[list[int]]
    params: SamplingParams
    score_top_k: int | None = None  # echo with logprobs: score the prompt, with this many alternatives


@dataclass(frozen=True)
class PromptDone:
    """Prompt ``index`` went through the model (its scores when asked for)."""

    index: int
    scores: PromptScores | None
    time: float


@dataclass(frozen=True)
class TokenOut:
    """One engine event of prompt ``index``, stamped with ``time.monotonic()`` on the engine thread."""

    index: int
    event: TokenEvent
    time: float


_END = object()


def generation_job(model: Any, tokenizer: Any, req: PreparedRequest, stop_ids: frozenset[int],
                   emit: Callable[[Any], None], after: Callable[[int], None] | None = None,
                   before: Callable[[], None] | None = None) -> Callable[[JobContext], None]:
    """The job the worker runs for ``req``: prefill and stream each prompt, emitting events.

    ``after(tokens)`` runs on the engine thread when the job ends, however it ends, with the tokens
    that went through the model (prompts and generated tokens): the resident-set warm-up counts them.
    ``before()`` runs on the engine thread before the first prompt (``--resident-set reset``).
    """

    def run(ctx: JobContext) -> None:
        tokens = 0
        if before is not None:
            before()
        try:
            for index, ids in enumerate(req.prompts):
                if ctx.cancel.is_set():
                    return
                if index > 0 and ctx.deadline is not None and time.monotonic() >= ctx.deadline:
                    raise TimeLimitError(f"the time limit passed after {index} of {len(req.prompts)} prompts")
                state = prefill(model, ids, score_top_k=req.score_top_k,
                                max_new_tokens=req.params.max_tokens)
                tokens += len(ids)
                emit(PromptDone(index, state.scores, time.monotonic()))
                for event in stream_from_prefill(model, tokenizer, ids, state, req.params, cancel=ctx.cancel,
                                                 deadline=ctx.deadline, stop_ids=stop_ids):
                    tokens += event.token_id is not None
                    emit(TokenOut(index, event, time.monotonic()))
                    ctx.heartbeat()
        finally:
            if after is not None:
                after(tokens)

    return run


class RunningRequest:
    """A submitted request: iterate :meth:`events` (re-raises the job's exception at the end).

    ``concluded`` is set once the request's outcome is in the metrics (its duration observed), so
    that however it ends (finished, cancelled by its client, failed, stopped by a shutdown) it is
    counted exactly once. ``stopped_by_server`` marks a job the server stopped while shutting down.
    """

    def __init__(self, worker: EngineWorker, model: Any, tokenizer: Any, req: PreparedRequest,
                 stop_ids: frozenset[int], after: Callable[[int], None] | None = None,
                 before: Callable[[], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.arrival = time.monotonic()
        self.concluded = False
        self.stopped_by_server = False

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                job = getattr(self, "job", None)
                if job is not None:
                    job.cancel_event.set()

        self.job: Job = worker.submit(generation_job(model, tokenizer, req, stop_ids, emit, after, before))
        self.job.future.add_done_callback(lambda _f: emit(_END))

    def cancel(self) -> None:
        self.job.cancel()

    def stop_by_server(self) -> None:
        """Shutdown: a waiting job never runs (its client gets 503), a running one ends at its next token."""
        self.stopped_by_server = True
        self.job.cancel()

    @property
    def started(self) -> bool:
        return self.job.started is not None

    @property
    def done(self) -> bool:
        return self.job.future.done()

    async def events(self) -> AsyncIterator[PromptDone | TokenOut]:
        while True:
            item = await self._queue.get()
            if item is _END:
                future = self.job.future
                if not future.cancelled() and future.exception() is not None:
                    raise future.exception()  # type: ignore[misc]
                return
            yield item

    def queue_wait(self) -> float | None:
        return None if self.job.started is None else self.job.started - self.job.submitted
