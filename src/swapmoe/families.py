"""Recognising MoE layers in a transformers model (one generic adapter, small per-family hooks).

transformers 5.x stores the experts of most MoE families as one *experts module* with fused 3D
tensors (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, optional biases ``[E, ...]``) next to a
*router* module returning ``(logits [T, E], weights [T, K], indices [T, K])``. swapmoe recognises that
pair structurally, so a family it has never seen still works when it follows the layout; the only
per-family knowledge is the routing rule used by Masked Gating's *exchange* strategy
(:data:`FAMILY_RULES`). Families that share the layout but have no rule fall back to
:func:`swapmoe.routing.substitute`.

A rule belongs to a router, not to a ``model_type``: a family that borrows another's modules
(``sarvam_moe`` is built from ``Glm4Moe*`` modules) routes as the family whose router class it runs,
so the rule is chosen by the module that defines the router's class first (:func:`rule_family`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from swapmoe.adapters import UNADAPTED_EXPERTS
from swapmoe.adapters.base import SparseExperts
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
    "hunyuan_v1_moe": "softmax_topk",  # router weight in a child Linear (``gate.wg``), kept in float32
    "afmoe": "sigmoid_topk",  # router weight in a child Linear (``router.gate``), bias on the block
    # through an adapter (swapmoe.adapters): converted to the fused layout at load
    "llama4": "topk_sigmoid",
    "llama4_text": "topk_sigmoid",
    "switch_transformers": "softmax_topk",
    "dbrx": "softmax_topk_pnorm",
    "jetmoe": "topk_softmax",
}

# Names under which MoE blocks keep their router, in the order we look for them.
_ROUTER_NAMES = ("gate", "router")
# Families whose router returns float32 weights (no cast back to the hidden states' dtype).
_FLOAT32_WEIGHTS = frozenset({"mixtral", "deepseek_v2", "deepseek_v3", "glm4_moe", "afmoe"})
# Families whose router casts its weights to the dtype of its own (child) weight, not of the hidden states.
_ROUTER_DTYPE_WEIGHTS = frozenset({"hunyuan_v1_moe"})


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

    @property
    def router_weight(self) -> torch.Tensor:
        """The ``[E, H]`` routing weight: the router's own, or its child Linear's (HunYuan, AFMoE)."""
        return router_weight(self.router, self.num_experts)

    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (all per-expert tensors)."""
        total = 0
        for n in self.expert_param_names:
            p = getattr(self.experts, n)
            total += p[0].numel() * p.element_size()
        return total


def supported_families() -> list[str]:
    """The tested families: those with a routing rule of their own, and those with an adapter."""
    from swapmoe.adapters import ADAPTERS

    return sorted(set(FAMILY_RULES) | set(ADAPTERS))


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
    if w is None and isinstance(module, SparseExperts):  # an adapter's, under its family's names (DBRX w1)
        w = next((p for p in module.parameters(recurse=False) if p.dim() == 3), None)
    return isinstance(w, torch.Tensor) and w.dim() == 3 and w.shape[0] == num


def _is_routing_weight(w: object, num_experts: int) -> bool:
    return isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == num_experts


def router_weight(router: nn.Module, num_experts: int) -> torch.Tensor | None:
    """A router's ``[E, H]`` weight: its own ``weight``, else that of its one child ``nn.Linear`` to
    ``E`` outputs (HunYuan's ``gate.wg``, AFMoE's ``router.gate``), else None."""
    own = getattr(router, "weight", None)
    if _is_routing_weight(own, num_experts):
        return own
    children = [c.weight for c in router.children() if isinstance(c, nn.Linear)
                and _is_routing_weight(c.weight, num_experts)]
    return children[0] if len(children) == 1 else None


def _router_of(block: nn.Module, num_experts: int) -> nn.Module | None:
    """The module the block calls to route (hooked by the runtime): it holds the routing weight itself
    or in a child Linear."""
    for name in _ROUTER_NAMES:
        r = getattr(block, name, None)
        if type(r) is nn.Linear:  # a subclass may return the tuple (PhiMoE's router does)
            continue  # returns logits only and the block routes itself (Jamba in transformers 5.17): no hook point
        if isinstance(r, nn.Module) and router_weight(r, num_experts) is not None:
            return r
    return None


# Names a router or a config gives its top-k, in the order we look for them.
_TOP_K_NAMES = ("top_k", "num_experts_per_tok", "top_k_experts", "moe_topk", "moe_k", "num_experts_per_token")


def _top_k(router: nn.Module, config) -> int:
    """The router's top-k: its own attribute, else its config's, else the model's (text) config's."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    for source in (router, getattr(router, "config", None), config, text):
        # a config's "top_k" is a sampling setting in some releases, not the router's
        for name in _TOP_K_NAMES if source is router else _TOP_K_NAMES[1:]:
            k = getattr(source, name, None) if source is not None else None
            if isinstance(k, int) and not isinstance(k, bool) and k > 0:
                return k
    raise UnsupportedModelError(f"cannot tell the router's top-k for {type(router).__name__}")


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


def rule_family(model_type: str, router: nn.Module) -> str | None:
    """The family whose routing rule ``router`` follows, or None (generic substitution).

    The transformers model package that defines the router's class decides first, so a family built
    from another family's modules (``sarvam_moe`` from ``Glm4Moe*``) routes as that family; a router
    of swapmoe's own (an adapter's) or of an unknown package falls back to ``model_type``.
    """
    parts = type(router).__module__.split(".")
    if len(parts) >= 3 and parts[:2] == ["transformers", "models"] and parts[2] in FAMILY_RULES:
        return parts[2]
    return model_type if model_type in FAMILY_RULES else None


def rule_for(
    model_type: str, router: nn.Module, top_k: int, compute_dtype: torch.dtype, block: nn.Module | None = None
) -> tuple[Rule | None, RuleParams | None]:
    """The exchange rule of a family and its constants read from the router (None: generic fallback).

    ``compute_dtype`` is the dtype of the hidden states: families that cast their gate weights back
    to it (all but Mixtral, the DeepSeek/GLM and AFMoE float32 routers, and HunYuan, which casts to
    its router's dtype) get the same cast. ``block`` is the MoE block, where AFMoE keeps its
    score-correction bias (it hands it to the router as an argument).
    """
    family = rule_family(model_type, router)
    if family is None:
        return None, None
    name = FAMILY_RULES[family]
    bias = getattr(router, "e_score_correction_bias", None)
    statics = getattr(router, "moe_statics", None)
    if statics is not None:
        bias = statics.e_score_correction_bias.squeeze()
    if bias is None and isinstance(getattr(block, "expert_bias", None), torch.Tensor):
        bias = block.expert_bias  # AFMoE: [E], passed to its router's forward
    if family in _FLOAT32_WEIGHTS:
        out_dtype = None
    elif family in _ROUTER_DTYPE_WEIGHTS:
        linears = [c for c in router.modules() if isinstance(c, nn.Linear)]
        out_dtype = linears[0].weight.dtype if linears else compute_dtype
    else:
        out_dtype = compute_dtype
    params = RuleParams(
        top_k=top_k,
        norm_topk_prob=bool(getattr(router, "norm_topk_prob", family in ("mixtral", "hunyuan_v1_moe", "afmoe"))),
        out_dtype=out_dtype,
        scaling=float(getattr(router, "routed_scaling_factor", None) or getattr(router, "route_scale", None)
                      or 1.0),
        num_group=int(getattr(router, "num_group", 1) or 1),
        topk_group=int(getattr(router, "topk_group", 1) or 1),
        topk_method=str(getattr(router, "topk_method", "greedy")),
        norm_min=float(getattr(router, "norm_min", 0.0) or 0.0),
        jitter_eps=float(getattr(router, "router_jitter_noise", 0.0) or 0.0),
        norm_p=getattr(router, "norm_p", None),
        bias=bias,
    )
    return RULES[name], params
