"""Tiny random checkpoints of the adapted families, saved as a user would have them.

DBRX, JetMoE and LongCat-Flash (2 layers, 8 experts, top-2; LongCat-Flash with 2 zero-compute
experts more) come from the family walk's tiny configs (tests/family_walk.py).

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

ALL_ADAPTED = ("llama4_text", "switch_transformers", "dbrx", "jetmoe", "longcat_flash")
SWITCH_CAPACITY = 3


def _available(family: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return family in CONFIG_MAPPING_NAMES


# the adapted families the installed transformers has (gate: the GPU machine runs an older release)
ADAPTED = tuple(f for f in ALL_ADAPTED if _available(f))
# MoE layers of each tiny model (Switch: 2 encoder + 2 decoder), transformer layers, top-k
MOE_LAYERS = {"llama4_text": 2, "switch_transformers": 4, "dbrx": 2, "jetmoe": 3, "longcat_flash": 2}
# (LongCat-Flash: transformers counts its two attention sublayers per decoder layer)
NUM_LAYERS = {"llama4_text": 3, "switch_transformers": 8, "dbrx": 2, "jetmoe": 3, "longcat_flash": 4}
# expert parameters a host budget streams past host memory while loading (those that keep the
# checkpoint's name and shape through the adapter): Llama 4's two per layer, LongCat-Flash's down_proj
STREAMED = {"llama4_text": 4, "longcat_flash": 2}
TOP_K = {"llama4_text": 1, "switch_transformers": 1, "dbrx": 2, "jetmoe": 2, "longcat_flash": 2}
# at a 100% budget: bit-identical to transformers, except Llama 4 (per-expert products: float rounding)
BIT_EXACT = frozenset({"switch_transformers", "dbrx", "jetmoe", "longcat_flash"})

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


# outside the initial resident set {0, 1, 2, 3} ("first", 4 of 8 slots): one expert per top-1 family
# (with two equally preferred experts, noise would decide between them token by token), two for top-2
PREFERRED = {"llama4_text": (6,), "switch_transformers": (6,), "dbrx": (5, 6), "jetmoe": (5, 6),
             "longcat_flash": (5, 6)}


def skew(model) -> None:
    """Every token embedding gets a large dimension 0, which every router reads as 'prefer PREFERRED'
    (LongCat-Flash's zero-compute experts, rows 8 and 9 of its router, are not preferred either)."""
    model.get_input_embeddings().weight[:, 0] = 8.0
    for w in routers(model):
        w[:, 0] = -4.0
        w[list(PREFERRED[model.config.model_type]), 0] = 4.0


def tiny_config(family: str, **overrides: Any):
    """Llama 4 and Switch: the configs above; the others: the family walk's tiny config
    (tests/family_walk.py: DBRX, JetMoE, LongCat-Flash with 8 experts, top-2, hidden 32)."""
    from transformers import AutoConfig

    if family in _CONFIGS:
        return AutoConfig.for_model(family, **{**_CONFIGS[family], **overrides})
    from tests.family_walk import tiny_config as walk_config

    config = walk_config(family)
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


def routers(model: nn.Module) -> list[torch.Tensor]:
    """The ``[E, H]`` routing weight of every MoE block of a *plain* transformers model, in order."""
    out = []
    for m in model.modules():
        kind = type(m).__name__
        if kind == "Llama4Router":
            out.append(m.weight)
        elif kind in ("SwitchTransformersTop1Router", "LongcatFlashTopkRouter"):
            out.append(m.classifier.weight)  # LongCat-Flash: [E + Z, H], zero-compute experts last
        elif kind in ("DbrxRouter", "JetMoeTopKGating"):
            out.append(m.layer.weight)
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
