"""What the fused MoE kernel computes, written plainly in torch (float64 by default): the definition the
kernel is tested and benchmarked against (tests/test_fused_moe.py, benchmarks/fused_moe.py).

    T = tokens, K = experts per token, S = slots, H = hidden size, I = intermediate size
"""

from __future__ import annotations

import torch

from swapmoe.quant import dequantise


def dequantised(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, zero: torch.Tensor | None = None,
                bits: int = 8) -> torch.Tensor:
    """Codes and their group scales (and the zero points of int4, int3, int2) -> weights, as
    :mod:`swapmoe.quant` decodes them (``bits`` 8: int8, 4: int4, 3: int3, 2: int2); ``q`` itself when
    unquantised."""
    if scale is None:
        return q.to(dtype)
    parts = {"q": q, "scale": scale} if zero is None else {"q": q, "scale": scale, "zero": zero}
    return dequantise(parts, f"int{bits}", torch.float64).to(dtype)


def _at(t: torch.Tensor | None, s: int) -> torch.Tensor | None:
    return None if t is None else t[s]


def reference_experts(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, ex: object, act: int = 0,
                      alpha: float = 1.702, limit: float = 7.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``out[t] = sum_k weights[t, k] * expert_{ids[t, k]}(hidden[t])`` in ``dtype``; ``ex`` is a
    :class:`swapmoe.kernels.fused_moe.ExpertTensors` (any object with its fields). A term with an id
    outside ``[0, S)`` is skipped; only the slots of the other terms are read."""
    S = ex.gate_up.shape[0]
    T, K = ids.shape
    out = torch.zeros((T, hidden.shape[1]), dtype=dtype, device=hidden.device)  # [T, H]
    for t in range(T):
        for k in range(K):
            s = int(ids[t, k])
            if not 0 <= s < S:
                continue
            gu = dequantised(ex.gate_up[s], _at(ex.gate_up_scale, s), dtype, _at(ex.gate_up_zero, s), ex.bits)
            dn = dequantised(ex.down[s], _at(ex.down_scale, s), dtype, _at(ex.down_zero, s), ex.bits)
            if ex.transposed:
                gu, dn = gu.T, dn.T  # -> [2I, H], [H, I]
            y = gu @ hidden[t].to(dtype)  # [2I]
            if ex.gate_up_bias is not None:
                y = y + ex.gate_up_bias[s].to(dtype)
            gate, up = (y[0::2], y[1::2]) if ex.interleaved else y.chunk(2)
            if act == 0:
                h = torch.nn.functional.silu(gate) * up
            else:
                g = gate.clamp(max=limit)
                h = (up.clamp(-limit, limit) + 1) * g * torch.sigmoid(alpha * g)
            z = dn @ h  # [H]
            if ex.down_bias is not None:
                z = z + ex.down_bias[s].to(dtype)
            out[t] += weights[t, k].to(dtype) * z
    return out
