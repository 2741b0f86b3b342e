"""The fused MoE kernel as one opaque PyTorch operator, ``torch.ops.swapmoe.fused_experts``.

Why an operator: a decode step compiled by inductor (``compile_step``, swapmoe/engine/compiled_step.py)
would otherwise trace into the kernel launches and recompile the user-defined Triton kernels itself,
which failed on the H200 (an exception in inductor's compile worker). As a custom operator the kernel
stays the one swapmoe compiled and tested: dynamo records one call with a known output shape (the fake
implementation below), inductor fuses everything around it, and the decoder's CUDA graph captures the
launches as it captures them uncompiled.

Importing this module registers the operator (in swapmoe's own namespace, once per process); the
implementation imports the kernel module at call time, so the CPU tests' interpreter import of it is
the one that runs.

    T = tokens, K = experts per token, S = slots, H = hidden size
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the kernel module imports Triton: only when a call needs it
    from swapmoe.kernels.fused_moe import ExpertTensors


@torch.library.custom_op("swapmoe::fused_experts", mutates_args=())
def fused_experts(
    hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
    gate_up: torch.Tensor, down: torch.Tensor,
    gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
    gate_up_scale: torch.Tensor | None, down_scale: torch.Tensor | None,
    transposed: bool, interleaved: bool, act: int, alpha: float, limit: float,
    gate_up_zero: torch.Tensor | None = None, down_zero: torch.Tensor | None = None, bits: int = 8,
) -> torch.Tensor:
    """:func:`swapmoe.kernels.fused_moe.fused_experts` on the tensors of an ``ExpertTensors``:
    ``hidden [T, H]``, ``ids [T, K]`` slot ids (``>= S``: skipped), ``weights [T, K]`` -> ``[T, H]``.
    ``bits``: of the quantised codes (8: int8; 4, 3, 2: int4, int3, int2, with the zero points ``*_zero``)."""
    from swapmoe.kernels.fused_moe import ExpertTensors
    from swapmoe.kernels.fused_moe import fused_experts as kernel

    ex = ExpertTensors(gate_up=gate_up, down=down, gate_up_bias=gate_up_bias, down_bias=down_bias,
                       gate_up_scale=gate_up_scale, down_scale=down_scale,
                       transposed=transposed, interleaved=interleaved,
                       gate_up_zero=gate_up_zero, down_zero=down_zero, bits=bits)
    return kernel(hidden, ids, weights, ex, act, alpha, limit)


@fused_experts.register_fake
def _(hidden: torch.Tensor, ids: torch.Tensor, *args: object) -> torch.Tensor:
    return hidden.new_empty((ids.shape[0], hidden.shape[-1]))  # [T, H] in hidden's dtype


def call(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, ex: ExpertTensors, act: int, alpha: float,
         limit: float) -> torch.Tensor:
    """The operator on an ``ExpertTensors`` ``ex``."""
    return torch.ops.swapmoe.fused_experts(
        hidden, ids, weights, ex.gate_up, ex.down, ex.gate_up_bias, ex.down_bias,
        ex.gate_up_scale, ex.down_scale, ex.transposed, ex.interleaved, act, float(alpha), float(limit),
        ex.gate_up_zero, ex.down_zero, int(ex.bits),
    )
