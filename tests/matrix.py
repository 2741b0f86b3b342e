"""Small pieces the family matrices share (tests/test_loader.py and tests/adapters): prompts, greedy
decoding, one MoE block's output for one token, and the bytes a model's tensors hold."""

from __future__ import annotations

import torch

from tests.tiny_models import VOCAB


def prompt(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    """Seeded token ids ``[batch, length]`` (ids 0 and 1 are pad and bos)."""
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids: torch.Tensor, new: int = 8) -> torch.Tensor:
    """Exactly ``new`` greedy tokens after ``ids``."""
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def distinct_weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights share)."""
    ptrs, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in ptrs:
            ptrs.add(t.data_ptr())
            total += nbytes(t)
    return total


def block_out(block, token: torch.Tensor) -> torch.Tensor:
    """A MoE block's output ``[1, H]`` for one token ``[H]`` (some blocks also return router logits)."""
    out = block(token.view(1, 1, -1))
    return (out[0] if isinstance(out, tuple) else out).reshape(1, -1)


def call_router(layer, x: torch.Tensor):
    """A MoE layer's router on hidden states ``x [T, H]``, called as its block calls it.

    AFMoE's router takes ``[B, S, H]`` and the score-correction bias its block keeps (an argument);
    every other router takes the hidden states alone.
    """
    import inspect

    if "expert_bias" in inspect.signature(type(layer.router).forward).parameters:
        return layer.router(x[None], layer.block.expert_bias)
    return layer.router(x)
