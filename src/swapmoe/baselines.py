"""Named policies, so that evaluation compares swapmoe with what a user would otherwise run.

Every policy loads the same checkpoint at the same expert budget (except ``full`` and ``static``)
and returns a model whose ``.logits`` are comparable:

=================== ==========================================================================
full                every expert resident: the original model (budget ignored)
swapmoe             Virtual Experts, Masked Gating (exchange), amortised asynchronous updates
swapmoe-skip        the same with the skip strategy
swapmoe-int8        swapmoe with experts held in int8 (swapmoe.quant): the same bytes hold ~1.9x the experts
swapmoe-int4        the same in int4 (~3.6x the experts)
swapmoe-int3        the same in int3 (~4.6x the experts)
swapmoe-int2        the same in int2 (~6.4x the experts)
quantized-all       every expert quantised to the least lossy format (quant.FORMATS, bf16 to int2) in
                    which all of them fit the budget, all resident, no swapping (what a llama.cpp user
                    does); where even int2 does not fit, int2 with the largest-norm experts that fit, fixed
ondemand            exact: missing experts loaded when requested into LRU slots (same budget)
random-keep         a fixed random subset per layer, Masked Gating, no swapping
magnitude-keep      a fixed subset with the largest ||E_i|| per layer, Masked Gating, no swapping
static              the dense twin with the same active parameters (reference model only)
accelerate-offload  plain transformers with accelerate's device_map/max_memory offloading (GPU)
=================== ==========================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from swapmoe.errors import SwapMoEError

POLICIES = ("full", "swapmoe", "swapmoe-skip", "ondemand", "random-keep", "magnitude-keep", "static",
            "accelerate-offload", "swapmoe-int8", "swapmoe-int4", "swapmoe-int3", "swapmoe-int2", "quantized-all")
#: swapmoe with its experts held in the format its name ends with
QUANTISED_SWAPMOE = ("swapmoe-int8", "swapmoe-int4", "swapmoe-int3", "swapmoe-int2")
#: policies whose expert memory is bounded by the budget
BUDGETED = ("swapmoe", "swapmoe-skip", "ondemand", "random-keep", "magnitude-keep", "accelerate-offload",
            *QUANTISED_SWAPMOE, "quantized-all")
#: policies that hold experts in ``expert_dtype=`` (eval/sweep ``--expert-dtype``) when given one: the
#: Virtual Experts runtime at a budget. ``full`` stays the original model (the reference), ``static`` and
#: ``accelerate-offload`` are plain transformers, and the policies whose precision is in their name keep it.
TAKE_EXPERT_DTYPE = ("swapmoe", "swapmoe-skip", "ondemand", "random-keep", "magnitude-keep")


def dense_twin_path(model_path: str | Path | None) -> Path:
    """Where the dense twin of a model lives: ``<model>-dense``, or ``ref-dense`` beside ``ref-moe``."""
    from swapmoe.loader import default_model_path

    p = Path(model_path) if model_path is not None else default_model_path()
    candidates = [p.with_name(p.name.replace("-moe", "-dense")), p.with_name(p.name + "-dense")]
    for c in candidates:
        if c != p and (c / "config.json").is_file():
            return c
    raise SwapMoEError(
        f"policy 'static' needs a dense twin of {p} (looked for {', '.join(str(c) for c in candidates)}); "
        "it exists for the bundled reference model (models/ref-dense)"
    )


def load_policy(name: str, path: str | Path | None, memory_budget: Any, **kw: Any) -> Any:
    """Load ``path`` as policy ``name`` at ``memory_budget`` (see the module table).

    ``kw`` goes to :func:`swapmoe.load` (update_interval, swaps_per_update, device, dtype, seed, ...);
    its ``expert_dtype`` only to the policies of :data:`TAKE_EXPERT_DTYPE`.
    """
    import swapmoe

    if name not in POLICIES:
        raise SwapMoEError(f"unknown policy {name!r}; choose from: {', '.join(POLICIES)}")
    expert_dtype = kw.pop("expert_dtype", None)
    if expert_dtype is not None and name in TAKE_EXPERT_DTYPE:
        kw["expert_dtype"] = expert_dtype
    if name == "full":
        return swapmoe.load(path, "100%", **kw)
    if name in ("swapmoe", "swapmoe-skip"):
        return swapmoe.load(path, memory_budget, strategy="exchange" if name == "swapmoe" else "skip", **kw)
    if name in QUANTISED_SWAPMOE:
        return swapmoe.load(path, memory_budget, expert_dtype=name.removeprefix("swapmoe-"), **kw)
    if name == "quantized-all":
        fmt = quantized_all_format(path, memory_budget, kw.get("dtype"))
        kw = {k: v for k, v in kw.items() if k not in ("swaps_per_update", "initial")}
        return swapmoe.load(path, memory_budget, expert_dtype=fmt, initial="magnitude", swaps_per_update=0, **kw)
    if name == "random-keep":
        return swapmoe.load(path, memory_budget, initial="random", swaps_per_update=0, **kw)
    if name == "magnitude-keep":
        return swapmoe.load(path, memory_budget, initial="magnitude", swaps_per_update=0, **kw)
    if name == "ondemand":
        from swapmoe.ondemand import OnDemand

        kw = {k: v for k, v in kw.items() if k not in ("update_interval", "swaps_per_update", "strategy", "cuda_graph")}
        # copies decided inside the forward cannot be captured: the exact baseline decodes eagerly
        model = swapmoe.load(path, memory_budget, swaps_per_update=0, cuda_graph=False, **kw)
        model.swapmoe_ondemand = OnDemand(model.swapmoe)
        return model
    # plain transformers models decode through swapmoe's decoder too (graph where possible): the flag
    # that turns the graph off for swapmoe models turns it off for them
    plain = _load_dense(dense_twin_path(path), kw) if name == "static" else _accelerate_offload(path, memory_budget, kw)
    if kw.get("cuda_graph") is False:
        plain.swapmoe_decode_mode = "dynamic"
    return plain


def quantized_all_format(path: str | Path | None, memory_budget: Any, dtype: Any = None) -> str | None:
    """The format ``quantized-all`` holds every expert in at ``memory_budget``: the least lossy in which
    all experts fit (None: the model's own dtype), else the most compact of :data:`swapmoe.quant.FORMATS`
    (then not all of them fit: the budget's worth stays fixed, and a warning says so)."""
    import logging

    import torch

    from swapmoe.budget import parse_budget
    from swapmoe.checkpoint import check_checkpoint
    from swapmoe.inspect import describe
    from swapmoe.loader import default_model_path, resolve_dtype
    from swapmoe.quant import FORMATS, lowest_fitting

    p = Path(path) if path is not None else default_model_path()
    resolved = resolve_dtype(dtype)
    info = describe(p, dtype=resolved if isinstance(resolved, torch.dtype) else check_checkpoint(p).auto_dtype())
    budget = parse_budget(memory_budget if memory_budget is not None else "100%").resolve(info.total_expert_bytes)
    totals: dict[str | None, int] = {None: info.total_expert_bytes}
    for f in FORMATS:  # from the most bytes to the fewest
        if f in info.expert_bytes_as and not (f == "bf16" and info.dtype == "bfloat16"):
            totals[f] = info.total_bytes(f)
    if info.published is not None:  # experts as published (MXFP4): exact, so first; then only smaller formats
        exact = info.total_bytes(info.published)
        totals = {None: exact, **{f: t for f, t in totals.items() if f is not None and t < exact}}
    fmt = lowest_fitting(budget, totals)
    if totals[fmt] > budget:
        logging.getLogger(__name__).warning(
            "quantized-all: even %s experts (%d bytes) exceed the budget (%d bytes); keeping the largest-norm "
            "experts that fit, fixed", fmt or info.published or info.dtype, totals[fmt], budget)
    return fmt


def _load_dense(path: Path, kw: dict[str, Any]) -> Any:
    """A dense model as plain transformers loads it (it has no experts to virtualise)."""
    from transformers import AutoModelForCausalLM

    from swapmoe.checkpoint import check_checkpoint
    from swapmoe.loader import resolve_device, resolve_dtype

    ckpt = check_checkpoint(path)
    model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=resolve_dtype(kw.get("dtype")), use_safetensors=True)
    return model.to(resolve_device(kw.get("device"))).eval()


def _accelerate_offload(path: str | Path | None, memory_budget: Any, kw: dict[str, Any]) -> Any:
    """Plain transformers, offloaded by accelerate so that the GPU holds the budget's worth of experts
    plus every other weight (``max_memory`` counts all weights, not only experts)."""
    import torch
    from transformers import AutoModelForCausalLM

    from swapmoe.budget import parse_budget
    from swapmoe.inspect import describe
    from swapmoe.loader import default_model_path, resolve_dtype

    if not torch.cuda.is_available():
        raise SwapMoEError("policy 'accelerate-offload' needs a CUDA GPU (it offloads from GPU to CPU memory)")
    p = Path(path) if path is not None else default_model_path()
    info = describe(p)
    budget = parse_budget(memory_budget if memory_budget is not None else "100%").resolve(info.total_expert_bytes)
    gpu_bytes = budget + info.other_bytes
    model = AutoModelForCausalLM.from_pretrained(
        p, dtype=resolve_dtype(kw.get("dtype")), device_map="auto",
        max_memory={0: gpu_bytes, "cpu": 10**13}, use_safetensors=True,
    )
    return model.eval()
