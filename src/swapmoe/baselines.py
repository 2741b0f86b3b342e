"""Named policies, so that evaluation compares swapmoe with what a user would otherwise run.

Every policy loads the same checkpoint at the same expert budget (except ``full`` and ``static``)
and returns a model whose ``.logits`` are comparable:

=================== ==========================================================================
full                every expert resident: the original model (budget ignored)
swapmoe             Virtual Experts, Masked Gating (exchange), amortised asynchronous updates
swapmoe-skip        the same with the skip strategy
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
            "accelerate-offload")
#: policies whose expert memory is bounded by the budget
BUDGETED = ("swapmoe", "swapmoe-skip", "ondemand", "random-keep", "magnitude-keep", "accelerate-offload")


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

    ``kw`` goes to :func:`swapmoe.load` (update_interval, swaps_per_update, device, dtype, seed, ...).
    """
    import swapmoe

    if name not in POLICIES:
        raise SwapMoEError(f"unknown policy {name!r}; choose from: {', '.join(POLICIES)}")
    if name == "full":
        return swapmoe.load(path, "100%", **kw)
    if name in ("swapmoe", "swapmoe-skip"):
        return swapmoe.load(path, memory_budget, strategy="exchange" if name == "swapmoe" else "skip", **kw)
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
