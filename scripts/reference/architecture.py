"""The reference MoE model's shape and its dense twin with the same active parameters per token.

Sizes are set by the repository, not by the GPU: both checkpoints ship in git
and travel with the working tree to the GPU machine on every call, so together
they stay under 32 MB (weights stored in bfloat16, shards under 15 MB), and
the MoE must still look like a real one to swapmoe: many experts per layer,
top-2 routing, every layer sparse.

    vocab 8192 (tied)       2.10 M parameters
    8 layers x attention    1.57 M   (hidden 256, 4 query heads of 64, 2 KV heads, QK-norm)
    8 layers x 16 experts   6.29 M   (expert intermediate 64, SwiGLU) + routers 0.03 M
    MoE total               9.99 M = 20.0 MB in bfloat16;  active per token 4.48 M
    dense twin              4.46 M =  8.9 MB in bfloat16

The dense twin replaces each MoE block by one SwiGLU MLP of intermediate
``top_k * moe_intermediate`` = 128: the same expert compute per token (the
MoE's only extra is its 16 x 256 router per layer), 45% of the parameters.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen3Config, Qwen3MoeConfig

SHAPE = {
    "hidden_size": 256,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 1024,  # trained on 512-token windows; RoPE carries a little beyond
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
}
NUM_EXPERTS = 16
TOP_K = 2
MOE_INTERMEDIATE = 64
ROUTER_AUX_LOSS_COEF = 0.01  # Switch load balancing, per layer (train.py: balance_loss); keeps all 16 experts in use
STORAGE_DTYPE = torch.bfloat16  # halves the checkpoint; trained in float32 with bf16 autocast


def moe_config(vocab_size: int, eos_id: int) -> Qwen3MoeConfig:
    """Qwen3-MoE: every layer sparse, top-2 of 16 with renormalised top-k weights."""
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        **SHAPE,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=MOE_INTERMEDIATE,
        intermediate_size=TOP_K * MOE_INTERMEDIATE,  # unused: no dense layers (mlp_only_layers empty)
        decoder_sparse_step=1,
        norm_topk_prob=True,
        output_router_logits=False,  # switched on for training only, where it adds the balancing loss
        router_aux_loss_coef=ROUTER_AUX_LOSS_COEF,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def dense_config(vocab_size: int, eos_id: int) -> Qwen3Config:
    """Qwen3 dense twin: one MLP per layer as wide as the MoE block's two active experts together."""
    return Qwen3Config(
        vocab_size=vocab_size,
        **SHAPE,
        intermediate_size=TOP_K * MOE_INTERMEDIATE,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total and active-per-token parameters (tied embeddings counted once)."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    cfg = model.config
    num_experts = getattr(cfg, "num_experts", None)
    active = total if not num_experts else total - experts + experts * cfg.num_experts_per_tok // num_experts
    return {"total": total, "experts": experts, "active": active}


def add_residual_dropout(model: nn.Module, p: float) -> list:
    """Dropout on every attention and MLP/MoE output before it joins the residual stream.

    Qwen3 has no hidden dropout of its own; the training text (1.3 M tokens) is small enough that
    a 10 M-parameter model overfits without it. Forward hooks act only in training mode, so the
    saved model is the plain architecture. Returns the hook handles.
    """
    def attn_hook(module: nn.Module, args: tuple, output: tuple) -> tuple:
        return (nn.functional.dropout(output[0], p, module.training), *output[1:])

    def mlp_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(output, p, module.training)

    handles = []
    for layer in model.model.layers:
        handles.append(layer.self_attn.register_forward_hook(attn_hook))
        handles.append(layer.mlp.register_forward_hook(mlp_hook))
    return handles
