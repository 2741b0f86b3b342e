"""A profile and budgets -> a :class:`swapmoe.plan.Plan` (what ``swapmoe plan`` writes and ``swapmoe
sweep``'s ``planned`` policy loads), with each layer's format named as ``swapmoe.load`` reads it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swapmoe.budget import parse_budget
from swapmoe.plan import Plan
from swapmoe.planner.perfmodel import Config, PerfModel, fit
from swapmoe.planner.search import Result, SearchSpace, search
from swapmoe.provenance import provenance


@dataclass(frozen=True)
class Planned:
    plan: Plan
    result: Result
    model: PerfModel
    budget_bytes: int


def base_format(data: dict[str, Any]) -> str | None:
    """The format a profile was measured in, as a plan names it: its ``--expert-dtype``, else
    ``bf16`` for a bfloat16 model, else None (the model's own dtype)."""
    fmt = data["meta"].get("expert_dtype")
    if fmt is not None:
        return str(fmt)
    return "bf16" if data["model"].get("dtype") == "bfloat16" else None


def plan_formats(data: dict[str, Any], cfg: Config, model: PerfModel) -> str | list[str | None] | None:
    """The plan's ``expert_dtype`` for a configuration: one entry per MoE layer where the performance
    model knows formats (the planner chose each), else the profile's single format (as before formats
    were profiled)."""
    if not model.format_bytes:
        return data["meta"].get("expert_dtype")
    base = base_format(data)
    return [f if f is not None else base for f in cfg.formats()]


def layer_format(data: dict[str, Any], name: str) -> str | None:
    """A format name (``--formats``) as the performance model keys it: None for the profile's base."""
    import torch

    from swapmoe.quant import parse_expert_dtype

    dt = getattr(torch, data["model"]["dtype"])
    base = parse_expert_dtype(data["meta"].get("expert_dtype"), dt)
    f = parse_expert_dtype(name, dt)
    return None if f == base else f


def make_plan(data: dict[str, Any], memory_budget: str | int, latency_budget: float | None = None,
              method: str = "dp", space: SearchSpace | None = None, metric: str = "kl", tolerance: float = 0.01,
              profile_path: str | Path | None = None, model: PerfModel | None = None) -> Planned:
    """Search the profile's performance model at ``memory_budget`` (a share is of the experts as the
    model holds them, as ``swapmoe.load`` counts it, whatever format the profile was measured in)."""
    pm = model if model is not None else fit(data)
    budget = parse_budget(memory_budget).resolve(data["model"].get("share_of_bytes", pm.total_bytes))
    result = search(pm, budget, latency_budget, method, space, metric, tolerance)
    cfg, pred = result.config, result.prediction
    assert pred.expert_bytes <= budget
    plan = Plan(slots=list(cfg.slots), update_interval=cfg.update_interval, swaps_per_update=cfg.swaps_per_update,
                strategy=cfg.strategy, expert_dtype=plan_formats(data, cfg, pm), meta={
                    "model": data["meta"]["model"], "budget": str(memory_budget), "budget_bytes": budget,
                    "latency_budget_s": latency_budget, "dtype": data["model"]["dtype"],
                    "device": data["meta"]["device"], "objective": "ppl" if metric == "nll" else metric,
                    "method": result.method,
                    "profile": str(Path(profile_path).resolve()) if profile_path is not None else None,
                    "predicted": {"expert_bytes": pred.expert_bytes, "decode_s_per_token": pred.decode_s_per_token,
                                  "kl": pred.kl, "perplexity": pred.perplexity},
                    "provenance": provenance(data["meta"]["device"]),
                })
    return Planned(plan, result, pm, budget)
