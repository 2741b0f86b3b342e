"""The engine worker: one job at a time, a bounded queue, cancellation, failures, time limits."""

import threading
import time

import pytest

from swapmoe.engine import EngineWorker, QueueFullError, WorkerClosedError


class _Model:  # the worker only reads model.swapmoe.stats()
    class swapmoe:  # noqa: N801
        @staticmethod
        def stats():
            return {"total": {"swaps": 0}, "layers": []}


def test_jobs_run_one_at_a_time_in_order():
    running, order, overlap = [], [], []
    with EngineWorker(_Model(), max_queue=10) as worker:

        def job(i):
            def run(ctx):
                running.append(i)
                overlap.append(len(running))
                time.sleep(0.01)
                order.append(i)
                running.remove(i)
                return i * i
            return run

        jobs = [worker.submit(job(i)) for i in range(8)]
        assert [j.future.result(5) for j in jobs] == [i * i for i in range(8)]
    assert order == list(range(8)) and max(overlap) == 1


def test_full_queue_raises_with_retry_after_and_cancelled_job_never_runs():
    gate = threading.Event()
    ran = []
    with EngineWorker(_Model(), max_queue=2) as worker:
        first = worker.submit(lambda ctx: gate.wait(5))
        while not worker.busy:
            time.sleep(0.001)
        waiting = worker.submit(lambda ctx: ran.append("waiting"))
        last = worker.submit(lambda ctx: ran.append("last"))
        with pytest.raises(QueueFullError) as info:
            worker.submit(lambda ctx: None)
        assert info.value.retry_after >= 1
        waiting.cancel()  # gives its place back at once
        assert worker.queue_length == 1
        third = worker.submit(lambda ctx: ran.append("third"))
        gate.set()
        first.future.result(5)
        last.future.result(5)
        third.future.result(5)
    assert ran == ["last", "third"] and waiting.future.cancelled()


def test_failing_job_reports_and_worker_goes_on():
    with EngineWorker(_Model()) as worker:
        bad = worker.submit(lambda ctx: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            bad.future.result(5)
        assert worker.submit(lambda ctx: "fine").future.result(5) == "fine"
        assert worker.stats() == {"total": {"swaps": 0}, "layers": []}


def test_running_job_sees_cancel_and_deadline():
    with EngineWorker(_Model(), time_limit=0.2) as worker:
        def run(ctx):
            assert ctx.deadline is not None and ctx.deadline - time.monotonic() <= 0.2
            return ctx.cancel.wait(5)
        job = worker.submit(run)
        time.sleep(0.05)
        job.cancel()
        assert job.future.result(5) is True


def test_close_fails_waiting_jobs():
    gate = threading.Event()
    worker = EngineWorker(_Model(), max_queue=4)
    worker.start()
    worker.submit(lambda ctx: gate.wait(5))
    waiting = worker.submit(lambda ctx: None)
    gate.set()
    worker.close()
    assert waiting.future.cancelled() or waiting.future.done()
    with pytest.raises(WorkerClosedError):
        worker.submit(lambda ctx: None)
    with pytest.raises(ValueError):
        EngineWorker(_Model(), max_queue=-1)
