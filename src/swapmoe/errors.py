"""User-facing errors.

Every error a user can cause (bad path, bad checkpoint, bad budget, bad plan, unsupported model)
is a :class:`SwapMoEError` whose message names the problem *and* the fix. The CLI prints these as
one line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SwapMoEError(Exception):
    """Base class of errors caused by user input (the CLI prints them without a traceback)."""


class CheckpointError(SwapMoEError):
    """The model directory is missing, incomplete, corrupt or of a kind we refuse to load."""


class UnsupportedModelError(SwapMoEError):
    """The model type has no MoE layers swapmoe knows how to virtualise."""


class BudgetError(SwapMoEError):
    """A memory budget is malformed or cannot be met."""


class PlanError(SwapMoEError):
    """A plan file is malformed or does not fit the model."""


def first_line(e: BaseException) -> str:
    """An exception's first line for a one-line log message (its type when it has no message: an empty
    message has no first line to index)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
