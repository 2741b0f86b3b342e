"""Tiny random MoE checkpoints of every tested family, saved to disk as a user would have them.

``make_checkpoint(family, dir)`` builds a seeded random model from a tiny config (hidden 32, 2-3
layers, 8 experts), optionally edits its weights, and saves it in one of two layouts:

* ``"legacy"``: ``save_pretrained``, which writes the per-expert names of published checkpoints
  (``...experts.3.gate_proj.weight``); transformers fuses them again on load;
* ``"fused"``: ``safetensors.save_file`` of the state dict, i.e. transformers 5.x's fused
  ``experts.gate_up_proj [E, 2I, H]`` names;

each as one file or ``sharded`` over several files with a ``model.safetensors.index.json``.
A family whose published checkpoints have no per-expert names (gpt-oss) has only the fused layout:
see :func:`layouts`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ALL_FAMILIES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "ernie4_5_moe",
    "granitemoe",
    "phimoe",
    "gpt_oss",
    "hunyuan_v1_moe",
    "afmoe",
)
LAYOUTS = ("legacy", "fused")
# Families whose checkpoints exist only with fused names: ``save_pretrained`` writes
# ``experts.gate_up_proj`` (gpt-oss was published that way, with no per-expert form to convert from).
_FUSED_ONLY = frozenset({"gpt_oss"})


def layouts(family: str) -> tuple[str, ...]:
    """The checkpoint layouts ``family`` comes in, so that tests cover each that exists."""
    return ("fused",) if family in _FUSED_ONLY else LAYOUTS


VOCAB = 96
_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": None,  # never stop early: generate always runs max_new_tokens
    "pad_token_id": 0,
}

# Per-family settings: 8 experts, top-2, and each family's routing features switched on
# (shared experts, grouped routing, score-correction bias, dense first layers).
_FAMILY: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 40, "norm_topk_prob": False,
    },
    "qwen3_moe": {
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 24, "head_dim": 8,
        "norm_topk_prob": True,
    },
    "olmoe": {"num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": False},
    "deepseek_v2": {
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 24,
        "num_hidden_layers": 3, "first_k_dense_replace": 1, "topk_method": "group_limited_greedy",
        "n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.5, "kv_lora_rank": 16, "q_lora_rank": None,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "num_key_value_heads": 4,
    },
    "deepseek_v3": {
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 24,
        "num_hidden_layers": 3, "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "kv_lora_rank": 16, "q_lora_rank": 24,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "num_key_value_heads": 4,
        "rope_interleave": True,
    },
    "glm4_moe": {
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 24,
        "num_hidden_layers": 3, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1, "head_dim": 8,
        "routed_scaling_factor": 1.0, "norm_topk_prob": True,
    },
    "ernie4_5_moe": {
        "moe_num_experts": 8, "moe_k": 2, "moe_intermediate_size": 24, "moe_num_shared_experts": 1,
        "num_hidden_layers": 3, "moe_layer_start_index": 1, "moe_layer_end_index": 2, "head_dim": 8,
    },
    "granitemoe": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "phimoe": {"num_local_experts": 8, "num_experts_per_tok": 2, "router_jitter_noise": 0.01},
    # sliding window (4) shorter than the prompts so that both attention kinds matter; YaRN like the
    # published models, scaled down; a SwiGLU limit the tiny activations reach, so that the clamp
    # matters (transformers 5.17 ignores it and clamps at 7.0)
    "gpt_oss": {
        "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 24, "head_dim": 8,
        "sliding_window": 4, "swiglu_limit": 0.25, "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                            "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 32},
    },
}


_FAMILY.update({
    # router weight in a child Linear (gate.wg, float32); top-k with renormalisation; a shared MLP
    "hunyuan_v1_moe": {"num_experts": 8, "moe_topk": 2, "head_dim": 8, "intermediate_size": 24},
    # router weight in a child Linear (router.gate); sigmoid + bias kept on the block; a dense first
    # layer, a shared expert, sliding and full attention
    "afmoe": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 24, "num_hidden_layers": 3,
              "num_dense_layers": 1, "num_shared_experts": 1, "head_dim": 8, "route_scale": 1.5,
              "global_attn_every_n_layers": 2, "sliding_window": 4},
})


def available(family: str) -> bool:
    """Whether the installed transformers has ``family`` (the GPU machine's 5.17 lacks some)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return family in CONFIG_MAPPING_NAMES


# the tested fused families the installed transformers has (gate: the GPU machine runs an older release)
FAMILIES = tuple(f for f in ALL_FAMILIES if available(f))


def tiny_config(family: str, **overrides: Any):
    from transformers import AutoConfig

    kw = {**_COMMON, **_FAMILY[family], **overrides}
    return AutoConfig.for_model(family, **kw)


def build_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> nn.Module:
    """A seeded random tiny model of ``family``; score-correction, router and expert biases get random
    values too (they start at zero or near it, and a zero bias would test nothing)."""
    from transformers import AutoModelForCausalLM

    from swapmoe.families import find_moe_layers

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for la in find_moe_layers(model):
            # routers start near zero (std 0.02): widen them so routing is decisive rather than near-ties
            la.router_weight.copy_(torch.randn(la.router_weight.shape, generator=gen) * 0.5)
            if isinstance(getattr(la.router, "bias", None), torch.Tensor):  # gpt-oss: logits = x W^T + b
                la.router.bias.copy_(torch.randn(la.router.bias.shape, generator=gen) * 0.5)
            for n in la.expert_param_names:
                if n.endswith("_bias"):  # gpt-oss: gate_up_proj_bias [E, 2I], down_proj_bias [E, H]
                    bias = getattr(la.experts, n)
                    bias.copy_(torch.randn(bias.shape, generator=gen) * 0.1)
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("e_score_correction_bias", "mlp.expert_bias")):  # zeros at init: make them matter
                t.copy_(torch.rand(t.shape, generator=gen) * 0.1)
    return model


def routers(model: nn.Module) -> list[nn.Module]:
    """Every MoE router (the modules that hold a ``[E, H]`` routing weight), in module order."""
    from swapmoe.families import find_moe_layers

    return [la.router for la in find_moe_layers(model)]


def _state_dict_for_safetensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        key = t.data_ptr()
        if key in seen and t.numel() > 0:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def save_checkpoint(model: nn.Module, path: str | Path, layout: str = "legacy", sharded: bool = False) -> Path:
    """Save ``model`` to ``path`` in ``layout`` ("legacy" or "fused"), in one file or several."""
    from safetensors.torch import save_file

    path = Path(path)
    family = model.config.model_type
    if layout not in layouts(family):
        raise ValueError(f"{family} checkpoints come only in layouts {layouts(family)}, not {layout!r}")
    path.mkdir(parents=True, exist_ok=True)
    if layout == "legacy":
        model.save_pretrained(path, max_shard_size="20KB" if sharded else "10GB")
        return path
    if layout != "fused":
        raise ValueError(f"layout must be one of {LAYOUTS}")
    model.config.save_pretrained(path)
    state = _state_dict_for_safetensors(model)
    if not sharded:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    names = list(state)
    parts = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file({n: state[n] for n in part}, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


def make_checkpoint(
    family: str,
    path: str | Path,
    layout: str = "legacy",
    sharded: bool = False,
    seed: int = 0,
    edit: Callable[[nn.Module], None] | None = None,
    **overrides: Any,
) -> Path:
    """Build, optionally ``edit`` (in place, under no_grad), and save a tiny ``family`` checkpoint."""
    model = build_model(family, seed=seed, **overrides)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    return save_checkpoint(model, path, layout=layout, sharded=sharded)


def make_dense_checkpoint(path: str | Path) -> Path:
    """A tiny dense Llama checkpoint (no experts): the unsupported-model case."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **_COMMON)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return Path(path)


def save_pickle_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """A ``pytorch_model.bin`` (pickle) checkpoint, as older repositories ship them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    torch.save(_state_dict_for_safetensors(model), path / "pytorch_model.bin")
    return path


def save_tokenizer(path: str | Path) -> Path:
    """A word-level tokenizer of ``VOCAB`` entries, so that the CLI's ``generate`` can run offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<unk>"]
    words = [f"w{i}" for i in range(VOCAB - len(specials) - 26)] + [chr(ord("a") + i) for i in range(26)]
    vocab = {t: i for i, t in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", unk_token="<unk>")
    tok.save_pretrained(path)
    return Path(path)
