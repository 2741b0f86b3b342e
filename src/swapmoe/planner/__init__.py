"""The offline planner: profile a model on this machine, fit a performance model, search for a plan.

    profile.py    measurements -> profile.json (resumable)           ``swapmoe profile``
    perfmodel.py  profile -> memory (exact), latency, accuracy of any configuration (pure)
    search.py     budgets -> the best configuration: exact DP, genetic algorithm, exhaustive (pure)
    commands.py   ``swapmoe profile`` and ``swapmoe plan``
    ablation.py   planned vs uniform vs count-importance at several budgets (docs/planner.md)

The measuring module imports torch; the model and the search do not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from swapmoe.planner.perfmodel import Config, PerfModel, Prediction, fit
from swapmoe.planner.search import InfeasibleError, Result, SearchSpace, search, uniform_config


def load_with_plan(path: str | Path | None, plan: str | Path, **kw: Any) -> Any:
    """``swapmoe.load(path, plan=plan)``: the slots, schedule, strategy and expert formats of a plan
    file (``kw`` may override the schedule, strategy or expert_dtype, not the slots)."""
    from swapmoe.loader import load

    if "memory_budget" in kw or "slots" in kw:
        raise TypeError("a plan sets the slots: give either a plan or memory_budget/slots, not both")
    return load(path, plan=plan, **kw)


__all__ = ["Config", "InfeasibleError", "PerfModel", "Prediction", "Result", "SearchSpace", "fit",
           "load_with_plan", "search", "uniform_config"]
