"""Tiny random Llama 4 (text) and Switch Transformers checkpoints, saved as a user would have them.

Llama 4: 3 decoder layers, MoE in layers 0 and 2 (a dense MLP between, as the 128-expert model
interleaves them), 8 experts, top-1 (as published) plus the shared expert. Switch: 4 encoder and
4 decoder blocks, every other one sparse (2 + 2 MoE layers), 8 experts, top-1, with an expert
capacity small enough that some tokens of an 8-token prompt are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests.tiny_models import VOCAB, save_checkpoint

ADAPTED = ("llama4_text", "switch_transformers")
SWITCH_CAPACITY = 3

_CONFIGS: dict[str, dict[str, Any]] = {
    "llama4_text": {
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 24, "intermediate_size_mlp": 48,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "num_local_experts": 8, "num_experts_per_tok": 1, "moe_layers": [0, 2], "max_position_embeddings": 128,
        "attention_chunk_size": 16, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": None,
        "pad_token_id": 0,
    },
    "switch_transformers": {
        "vocab_size": VOCAB, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 4, "num_decoder_layers": 4,
        "num_sparse_encoder_layers": 2, "num_sparse_decoder_layers": 2, "num_heads": 4, "num_experts": 8,
        "expert_capacity": SWITCH_CAPACITY, "router_jitter_noise": 0.0, "dropout_rate": 0.0,
        "decoder_start_token_id": 0, "eos_token_id": None, "pad_token_id": 0,
    },
}


# outside the initial resident set {0, 1, 2, 3} ("first", 4 of 8 slots); one expert, as both families
# route top-1 (with two equally preferred experts, noise decides between them token by token)
PREFERRED = (6,)


def skew(model) -> None:
    """Every token embedding gets a large dimension 0, which every router reads as 'prefer expert 6'."""
    model.get_input_embeddings().weight[:, 0] = 8.0
    for w in routers(model):
        w[:, 0] = -4.0
        w[list(PREFERRED), 0] = 4.0


def tiny_config(family: str, **overrides: Any):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**_CONFIGS[family], **overrides})


def routers(model: nn.Module) -> list[torch.Tensor]:
    """The ``[E, H]`` routing weight of every MoE block of a *plain* transformers model, in order."""
    out = []
    for m in model.modules():
        if type(m).__name__ == "Llama4Router":
            out.append(m.weight)
        elif type(m).__name__ == "SwitchTransformersTop1Router":
            out.append(m.classifier.weight)
    return out


def build_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> nn.Module:
    """A seeded random tiny plain-transformers model of ``family`` with decisive routers."""
    from swapmoe.families import auto_model_class

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = auto_model_class(config).from_config(config, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for w in routers(model):
            w.copy_(torch.randn(w.shape, generator=gen) * 0.5)
        if family == "llama4_text":  # transformers initialises gate_up_proj to zeros: give it values
            for m in model.modules():
                if type(m).__name__ == "Llama4TextExperts":
                    m.gate_up_proj.normal_(0.0, 0.2, generator=gen)
                    m.down_proj.normal_(0.0, 0.2, generator=gen)
    return model


def make_checkpoint(family: str, path: str | Path, sharded: bool = False, seed: int = 0,
                    edit: Callable[[nn.Module], None] | None = None, **overrides: Any) -> Path:
    """Build, optionally ``edit`` (in place, under no_grad), and ``save_pretrained`` a tiny checkpoint."""
    model = build_model(family, seed=seed, **overrides)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    return save_checkpoint(model, path, layout="legacy", sharded=sharded)


def make_llama4_multimodal_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """A tiny ``Llama4ForConditionalGeneration`` (model_type "llama4"), as Llama 4 Scout/Maverick ship:
    its text model under ``language_model.``, beside a vision model swapmoe does not load."""
    from transformers import AutoConfig, Llama4ForConditionalGeneration

    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 48,
              "vision_output_dim": 32, "projector_input_dim": 32, "projector_output_dim": 32,
              "image_size": 28, "patch_size": 14}
    config = AutoConfig.for_model("llama4", text_config=_CONFIGS["llama4_text"], vision_config=vision)
    torch.manual_seed(seed)
    model = Llama4ForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "Llama4TextExperts":
                m.gate_up_proj.normal_(0.0, 0.2, generator=gen)
            if type(m).__name__ == "Llama4Router":
                m.weight.normal_(0.0, 0.5, generator=gen)
    model.save_pretrained(path)
    return Path(path)
