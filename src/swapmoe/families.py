"""Recognising MoE layers in a transformers model (one generic adapter, small per-family hooks).

transformers 5.x stores the experts of most MoE families as one *experts module* with fused 3D
tensors (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, optional biases ``[E, ...]``) next to a
*router* module returning ``(logits [T, E], weights [T, K], indices [T, K])``. swapmoe recognises that
pair structurally, so a family it has never seen still works when it follows the layout; the only
per-family knowledge is the routing rule used by Masked Gating's *exchange* strategy
(:data:`FAMILY_RULES`). Families that share the layout but have no rule fall back to
:func:`swapmoe.routing.substitute`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from swapmoe.adapters import UNADAPTED_EXPERTS
from swapmoe.errors import UnsupportedModelError
from swapmoe.routing import RULES, Rule, RuleParams

# model_type -> routing rule of its router (see swapmoe.routing). These families are tested.
FAMILY_RULES: dict[str, str] = {
    "mixtral": "softmax_topk",
    "qwen2_moe": "softmax_topk",
    "qwen3_moe": "softmax_topk",
    "olmoe": "softmax_topk",
    "deepseek_v2": "softmax_grouped",
    "deepseek_v3": "sigmoid_grouped",
    "glm4_moe": "sigmoid_grouped",
    "ernie4_5_moe": "softmax_bias",
    "granitemoe": "topk_softmax",
    "phimoe": "sparsemixer",
    "gpt_oss": "topk_softmax_same_dtype",
    # through an adapter (swapmoe.adapters): converted to the fused layout at load
    "llama4": "topk_sigmoid",
    "llama4_text": "topk_sigmoid",
    "switch_transformers": "softmax_topk",
}

# Names under which MoE blocks keep their router, in the order we look for them.
_ROUTER_NAMES = ("gate", "router")


@dataclass
class MoELayer:
    """One MoE block found in the model."""

    index: int  # 0-based among MoE layers
    name: str  # module path of the MoE block, e.g. "model.layers.3.mlp"
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int
    expert_param_names: list[str]  # parameters of the experts module that are per-expert [E, ...]

    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (all per-expert tensors)."""
        total = 0
        for n in self.expert_param_names:
            p = getattr(self.experts, n)
            total += p[0].numel() * p.element_size()
        return total


def supported_families() -> list[str]:
    return sorted(FAMILY_RULES)


def require_causal_lm(model: Any, what: str) -> None:
    """Refuse an encoder-decoder (Switch Transformers) where a decoder-only LM is needed.

    ``model`` is a loaded model or just its transformers config, so commands can refuse before
    spending minutes on loading.
    """
    config = getattr(model, "config", model)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{what} needs a decoder-only (causal) LM, and {config.model_type!r} is an encoder-decoder; "
            "`swapmoe generate` runs it (text-to-text)"
        )


def auto_model_class(config) -> type:
    """The transformers Auto class for a config: seq2seq for encoder-decoders (Switch), else causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def _is_fused_experts(module: nn.Module) -> bool:
    num = getattr(module, "num_experts", None)
    if not isinstance(num, int) or num <= 0:
        return False
    w = getattr(module, "gate_up_proj", None)
    if w is None:
        w = getattr(module, "up_proj", None)
    return isinstance(w, torch.Tensor) and w.dim() == 3 and w.shape[0] == num


def _router_of(block: nn.Module, num_experts: int) -> nn.Module | None:
    for name in _ROUTER_NAMES:
        r = getattr(block, name, None)
        w = getattr(r, "weight", None)
        if isinstance(r, nn.Module) and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == num_experts:
            return r
    return None


def _top_k(router: nn.Module, config) -> int:
    k = getattr(router, "top_k", None)
    if not isinstance(k, int):
        k = getattr(config, "num_experts_per_tok", None)
    if not isinstance(k, int) or k <= 0:
        raise UnsupportedModelError(f"cannot tell the router's top-k for {type(router).__name__}")
    return k


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """All MoE blocks with a fused experts module and a router, in module order.

    Families that need an adapter (Llama 4, Switch Transformers) are found only after
    :func:`swapmoe.adapters.adapt` has converted their blocks.
    """
    layers: list[MoELayer] = []
    config = getattr(model, "config", None)
    for name, block in model.named_modules():
        experts = getattr(block, "experts", None)
        if not isinstance(experts, nn.Module) or not _is_fused_experts(experts):
            continue
        if type(experts).__name__ in UNADAPTED_EXPERTS:
            continue  # computed densely by transformers: only its adapter's form is virtualised
        router = _router_of(block, experts.num_experts)
        if router is None:
            continue
        per_expert = [
            n
            for n, p in experts.named_parameters(recurse=False)
            if p.dim() >= 2 and p.shape[0] == experts.num_experts
        ]
        layers.append(
            MoELayer(
                index=len(layers),
                name=name,
                block=block,
                router=router,
                experts=experts,
                num_experts=experts.num_experts,
                top_k=_top_k(router, config),
                expert_param_names=per_expert,
            )
        )
    return layers


def require_moe_layers(model: nn.Module) -> list[MoELayer]:
    """:func:`find_moe_layers`, or a clear error naming the supported families."""
    layers = find_moe_layers(model)
    if not layers:
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        raise UnsupportedModelError(
            f"model type {model_type!r} has no MoE layers swapmoe can virtualise (it looks for a fused "
            f"experts module beside a router). Supported and tested: {', '.join(supported_families())}"
        )
    return layers


def rule_for(
    model_type: str, router: nn.Module, top_k: int, compute_dtype: torch.dtype
) -> tuple[Rule | None, RuleParams | None]:
    """The exchange rule of a family and its constants read from the router (None: generic fallback).

    ``compute_dtype`` is the dtype of the hidden states: families that cast their gate weights back
    to it (all but Mixtral and the DeepSeek/GLM float32 routers) get the same cast.
    """
    name = FAMILY_RULES.get(model_type)
    if name is None:
        return None, None
    bias = getattr(router, "e_score_correction_bias", None)
    statics = getattr(router, "moe_statics", None)
    if statics is not None:
        bias = statics.e_score_correction_bias.squeeze()
    keeps_float32 = model_type in ("mixtral", "deepseek_v2", "deepseek_v3", "glm4_moe")
    out_dtype = None if keeps_float32 else compute_dtype
    params = RuleParams(
        top_k=top_k,
        norm_topk_prob=bool(getattr(router, "norm_topk_prob", model_type == "mixtral")),
        out_dtype=out_dtype,
        scaling=float(getattr(router, "routed_scaling_factor", 1.0) or 1.0),
        num_group=int(getattr(router, "num_group", 1) or 1),
        topk_group=int(getattr(router, "topk_group", 1) or 1),
        topk_method=str(getattr(router, "topk_method", "greedy")),
        norm_min=float(getattr(router, "norm_min", 0.0) or 0.0),
        jitter_eps=float(getattr(router, "router_jitter_noise", 0.0) or 0.0),
        bias=bias,
    )
    return RULES[name], params
