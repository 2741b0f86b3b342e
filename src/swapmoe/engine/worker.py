"""One job at a time on the model, from a bounded queue (batch 1: the edge setting of the paper).

An :class:`EngineWorker` owns one thread that runs submitted jobs in arrival order. A job is any
callable ``fn(ctx)``; it gets a :class:`JobContext` with a cancel event and a deadline, which it passes
on to :func:`swapmoe.engine.generate.stream_from_prefill`. Submitting to a full queue raises
:class:`QueueFullError` with an estimate of when to retry; a job cancelled while it waits never runs.
The worker also keeps a snapshot of the model's swapmoe counters (``model.swapmoe.stats()``), taken
between jobs and about once a second during a job, so that a metrics scrape never touches the model
while it computes. Nothing here knows about HTTP.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("swapmoe.engine")

# Seconds between counter snapshots while a job runs: /metrics stays fresh during a long
# generation, and stats() (one device sync per layer) costs nothing measurable at this rate.
STATS_INTERVAL_S = 1.0
# Weight of the newest job in the running mean of job durations behind Retry-After.
_DURATION_EMA = 0.2


class QueueFullError(RuntimeError):
    """The queue holds ``max_queue`` waiting jobs; ``retry_after`` is a guess in whole seconds."""

    def __init__(self, max_queue: int, retry_after: int) -> None:
        super().__init__(f"the queue is full ({max_queue} requests waiting)")
        self.retry_after = retry_after


class WorkerClosedError(RuntimeError):
    """The worker was closed before the job could run."""


@dataclass
class JobContext:
    """What a running job may look at: ``cancel`` (set when the caller gives up) and ``deadline``
    (a ``time.monotonic()`` value, or None) after which it should stop."""

    cancel: threading.Event
    deadline: float | None
    _worker: EngineWorker

    def heartbeat(self) -> None:
        """Call between tokens: refreshes the counter snapshot when it is older than a second."""
        self._worker._refresh_stats(min_age=STATS_INTERVAL_S)


class Job:
    """A submitted job: ``future`` resolves to ``fn``'s return value (or its exception)."""

    def __init__(self, fn: Callable[[JobContext], Any]) -> None:
        self.fn = fn
        self.future: Future = Future()
        self.cancel_event = threading.Event()
        self.submitted = time.monotonic()
        self.started: float | None = None

    def cancel(self) -> None:
        """Stop the job: a waiting job is dropped, a running one stops at its next check."""
        self.cancel_event.set()
        self.future.cancel()  # only succeeds while the job still waits


class EngineWorker:
    """Runs jobs one at a time on a thread of its own.

    max_queue   jobs allowed to wait while one runs (0: only the running one)
    time_limit  seconds a job may run once started (None: no limit); passed to it as its deadline
    """

    def __init__(self, model: Any, *, max_queue: int = 16, time_limit: float | None = None) -> None:
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if time_limit is not None and time_limit <= 0:
            raise ValueError("time_limit must be > 0 (or None for no limit)")
        self.model = model
        self.max_queue = max_queue
        self.time_limit = time_limit
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._model_lock = threading.Lock()  # held while a job runs, and while stats are read
        self._running: Job | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        self._mean_duration = 1.0  # seconds; a first guess until jobs have been timed
        self._stats: dict[str, Any] | None = None
        self._stats_time = 0.0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._refresh_stats()
            self._thread = threading.Thread(target=self._loop, name="swapmoe-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float | None = 10.0) -> None:
        """Cancel the running job, fail the waiting ones, and stop the thread."""
        with self._cond:
            self._closing = True
            waiting = list(self._queue)
            self._queue.clear()
            if self._running is not None:
                self._running.cancel_event.set()
            self._cond.notify_all()
        for job in waiting:
            job.cancel_event.set()
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(WorkerClosedError("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> EngineWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------- submitting
    def submit(self, fn: Callable[[JobContext], Any]) -> Job:
        """Queue ``fn`` to run on the worker thread; raise :class:`QueueFullError` when full."""
        job = Job(fn)
        with self._cond:
            if self._closing:
                raise WorkerClosedError("the worker is closed")
            busy = self._running is not None or bool(self._queue)
            if busy and len(self._queue) >= self.max_queue:
                raise QueueFullError(self.max_queue, self._retry_after())
            self._queue.append(job)
            self._cond.notify()
        job.future.add_done_callback(lambda _f, j=job: self._forget(j))
        return job

    def _forget(self, job: Job) -> None:
        """A job cancelled while waiting gives its place back at once."""
        if job.future.cancelled():
            with self._cond:
                if job in self._queue:
                    self._queue.remove(job)

    def _retry_after(self) -> int:
        return max(1, math.ceil(self._mean_duration * (len(self._queue) + 1)))

    @property
    def queue_length(self) -> int:
        """Jobs waiting (not counting the running one)."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return self._running is not None

    # -------------------------------------------------------------- running
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                job = self._queue.popleft()
                if not job.future.set_running_or_notify_cancel():
                    continue  # cancelled while waiting
                self._running = job
            self._run(job)
            with self._cond:
                self._running = None

    def _run(self, job: Job) -> None:
        job.started = time.monotonic()
        deadline = None if self.time_limit is None else job.started + self.time_limit
        ctx = JobContext(job.cancel_event, deadline, self)
        with self._model_lock:
            try:
                result = job.fn(ctx)
            except BaseException as e:  # the job's failure is its caller's to report; the worker goes on
                logger.debug("job failed", exc_info=e)
                job.future.set_exception(e)
            else:
                job.future.set_result(result)
            finally:
                elapsed = time.monotonic() - job.started
                self._mean_duration += _DURATION_EMA * (elapsed - self._mean_duration)
                self._refresh_stats_locked()

    # ------------------------------------------------------------- counters
    def _refresh_stats_locked(self) -> None:
        runtime = getattr(self.model, "swapmoe", None)
        if runtime is not None:
            try:
                self._stats = runtime.stats()
            except Exception:  # counters must never take the engine down
                logger.exception("reading swapmoe counters failed")
        self._stats_time = time.monotonic()

    def _refresh_stats(self, min_age: float = 0.0) -> None:
        if time.monotonic() - self._stats_time >= min_age:
            self._refresh_stats_locked()

    def stats(self) -> dict[str, Any] | None:
        """The latest swapmoe counters (fresh when the engine is idle), or None for a plain model."""
        if self._model_lock.acquire(blocking=False):
            try:
                self._refresh_stats_locked()
            finally:
                self._model_lock.release()
        return self._stats
