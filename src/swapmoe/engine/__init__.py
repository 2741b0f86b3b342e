"""Batch-1 text generation on any transformers causal LM (a ``swapmoe.load`` model is one).

Usable without the server::

    from swapmoe.engine import SamplingParams, generate
    result = generate(model, tokenizer, "Once upon a time", SamplingParams(max_tokens=32, seed=0))

:class:`EngineWorker` runs jobs one at a time from a bounded queue (what the server builds on).
"""

from swapmoe.engine.generate import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    FINISH_TIMEOUT,
    GenerationResult,
    Prefill,
    PromptScores,
    TokenEvent,
    context_length,
    generate,
    prefill,
    step,
    stop_token_ids,
    stream_from_prefill,
    stream_generate,
)
from swapmoe.engine.sampling import SamplingParams
from swapmoe.engine.worker import EngineWorker, Job, JobContext, QueueFullError, WorkerClosedError

__all__ = [
    "FINISH_CANCELLED",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "FINISH_TIMEOUT",
    "EngineWorker",
    "GenerationResult",
    "Job",
    "JobContext",
    "Prefill",
    "PromptScores",
    "QueueFullError",
    "SamplingParams",
    "TokenEvent",
    "WorkerClosedError",
    "context_length",
    "generate",
    "prefill",
    "step",
    "stop_token_ids",
    "stream_from_prefill",
    "stream_generate",
]
