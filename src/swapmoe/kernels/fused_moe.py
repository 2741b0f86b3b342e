"""A fused MoE decode kernel pair over slot ids, in Triton: the experts part of one MoE layer in two launches.

transformers' grouped_mm path runs a dozen small kernels per layer and call (sort, gather, histogram,
offsets, two grouped GEMMs, activation, weighting, inverse permutation, sum), and a batch-1 decode step
is bound by its kernel count (docs/benchmarks.md). Here the same computation is two kernels that read
each chosen expert's weights once, straight from the layer's ``[S, ...]`` slot tensors (no gather
copy), so that the bytes, not the launches, bound it:

1. ``_gate_up_kernel``, one program per (term, block of the intermediate dim):
   ``h[j] = act(gate_up[s_j] @ x_t)``, the gated activation fused in;
2. ``_down_kernel``, one program per (token, block of the hidden dim):
   ``out[t] = sum_k w_tk * (down[s_tk] @ h[tk] + b)``, summed per token in registers: no atomics,
   deterministic, no zero-filled output buffer.

A term whose slot id is ``>= S`` (or negative) is *skipped*: its program reads no byte of any slot
(the id is tested before any weight load, and a slot may be the target of a copy in flight) and it
adds nothing. Accumulation is float32 whatever the weights' dtype.

Weights are addressed through strides, so one kernel serves both layouts of transformers' fused experts:
``gate_up [S, 2I, H]`` / ``down [S, H, I]`` and the transposed ``[S, H, 2I]`` / ``[S, I, H]`` (gpt-oss),
with gate and up halves concatenated (``gate = rows [0, I)``) or interleaved (``gate = even rows``).
Quantised weights (:mod:`swapmoe.quant`) are dequantised inside the loads, in the ``[S, out, in]`` layout
only: int8 (``q`` int8 and a float16 scale per group of ``G`` values along the stored last dim,
``w = q * s``) and the packed formats int4, int3 and int2 (codes of 4, 3 or 2 bits along the input dim,
and a float16 scale ``s`` and zero point ``z`` per group, ``w = (code - z) * s``). A packed row is a
little-endian bit stream, code ``c`` in bits ``[bits*c, bits*(c+1))``, read in units: a byte of two
codes (int4: code ``2b`` in the low nibble of byte ``b``) or four (int2), or three bytes of eight
(int3). A loop step reads its units once (int3, where a step holds whole groups of a multiple of 32
codes: four units as three 32-bit words), splits each into its codes and takes the zero point once
per (row, group) where it holds whole groups: ``sum_k (c_k - z) s x_k = s (sum_k c_k x_k - z sum_k x_k)``.

Activations (``ACT``): 0 = SiLU-gated, ``silu(gate) * up`` (Mixtral, Qwen-MoE, OLMoE, DeepSeek, ...);
1 = gpt-oss's clamped SwiGLU, ``(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)`` with
``g = min(gate, l)``.

Everything here is shape-static for a given ``T*K`` and never reads a device value on the host, so the
launches can be captured in a CUDA graph (compile them with one eager call first).

    T = tokens, K = experts per token, J = T*K terms, S = slots, H = hidden size, I = intermediate size,
    G = values per scale (and zero point)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from swapmoe.quant import PACKED_BITS, PACKED_UNITS

ACT_SILU = 0
ACT_GPT_OSS = 1
#: bits per code of the quantised formats the kernels read (``ExpertTensors.bits``; the kernels' ``QUANT``,
#: 0 for float weights)
QUANT_BITS = (8, *PACKED_BITS.values())
#: (codes, bytes) of a packed unit per bits of a code (swapmoe.quant's formats): int4 and int2 a byte, int3
#: eight codes in three bytes
UNITS = {PACKED_BITS[fmt]: unit for fmt, unit in PACKED_UNITS.items()}


@dataclass(frozen=True)
class ExpertTensors:
    """One layer's per-slot tensors as the kernels read them (all ``[S, ...]`` on the same device).

    ``gate_up``/``down`` are the weights, or their codes ``q`` when ``*_scale`` is given: int8 for
    ``bits=8``; for ``bits`` 4, 3 or 2 uint8 bytes of packed codes (:data:`UNITS`), ``[S, out, in * bits/8]``,
    with ``*_zero`` the zero points (:mod:`swapmoe.quant`'s parts ``q``, ``scale``, ``zero``). ``transposed``: stored
    ``[S, in, out]`` rather than ``[S, out, in]``; ``interleaved``: gate and up rows alternate (gpt-oss)
    rather than being the two halves.
    """

    gate_up: torch.Tensor  # [S, 2I, H] (transposed: [S, H, 2I])
    down: torch.Tensor  # [S, H, I] (transposed: [S, I, H])
    gate_up_bias: torch.Tensor | None = None  # [S, 2I]
    down_bias: torch.Tensor | None = None  # [S, H]
    gate_up_scale: torch.Tensor | None = None  # int8, int4, int3, int2: [S, 2I, H/G]
    down_scale: torch.Tensor | None = None  # int8, int4, int3, int2: [S, H, I/G]
    transposed: bool = False
    interleaved: bool = False
    gate_up_zero: torch.Tensor | None = None  # int4, int3, int2: [S, 2I, H/G]
    down_zero: torch.Tensor | None = None  # int4, int3, int2: [S, H, I/G]
    bits: int = 8  # of the codes, when quantised (``*_scale`` given): 8 (int8), 4 (int4), 3 (int3) or 2 (int2)

    @property
    def num_slots(self) -> int:
        return self.gate_up.shape[0]

    @property
    def packed_bits(self) -> int:
        """Bits of the gate/up codes when packed (int4, int3, int2: 4, 3, 2), else 0."""
        return self.bits if self.gate_up_scale is not None and self.bits in UNITS else 0

    def dims(self) -> tuple[int, int]:
        """(H, I) from the down projection's shape."""
        out_in = self.down.shape[1:]
        h, i = (out_in[1], out_in[0]) if self.transposed else (out_in[0], out_in[1])
        if self.down_scale is not None and self.bits in UNITS:  # [S, H, I * bits/8] bytes of packed codes
            codes, nbytes = UNITS[self.bits]
            return int(h), int(i) * codes // nbytes
        return int(h), int(i)


# The kernels call language builtins only (tl.reduce, not tl.sum; tl.full, not tl.zeros): Triton's own
# jit helpers are defined when triton is first imported, and under a TRITON_INTERPRET=1 set after that
# (the CPU tests) they would not run. The sum's combine function is Triton's own where it has one: the
# interpreter recognises it and sums with numpy (a combine function of ours runs element by element).
@triton.jit
def _add(a, b):
    return a + b


_SUM = getattr(tl.standard, "_sum_combine", _add)


@triton.jit
def _code(u, j: tl.constexpr, BITS: tl.constexpr, zp, sc, PER_UNIT: tl.constexpr):
    """Code ``j`` of each unit ``u`` (bits ``[BITS*j, BITS*(j+1))``) as float32; with ``PER_UNIT`` the
    weight it stands for, ``(code - z) * s`` (``zp``, ``sc``: each unit's zero point and scale)."""
    c = ((u >> (BITS * j)) & ((1 << BITS) - 1)).to(tl.float32)
    if PER_UNIT:
        c = (c - zp) * sc
    return c


@triton.jit
def _codes_dot(u, xr, zp, sc, BITS: tl.constexpr, PER_UNIT: tl.constexpr):
    """``sum_j code_j(u) * x_j`` over the codes of each unit, float32 ``[..., U]`` (see :func:`_code`). ``u``
    ``[..., U]``: a byte of 2 (int4) or 4 (int2) codes, or int3's 24-bit word of 8; ``xr`` the x of each
    unit's codes as ``[..., U, 2]``, ``[..., U, 2, 2]`` or ``[..., U, 2, 2, 2]`` (row-major: code ``j`` at
    trailing index ``(j // 4, j // 2 % 2, j % 2)``), taken apart by ``tl.split``, which splits the last dim."""
    if BITS == 4:
        x0, x1 = tl.split(xr)
        return _code(u, 0, 4, zp, sc, PER_UNIT) * x0 + _code(u, 1, 4, zp, sc, PER_UNIT) * x1
    elif BITS == 2:
        x_even, x_odd = tl.split(xr)  # [..., U, 2]: codes 0, 2 and 1, 3
        x0, x2 = tl.split(x_even)
        x1, x3 = tl.split(x_odd)
        return ((_code(u, 0, 2, zp, sc, PER_UNIT) * x0 + _code(u, 1, 2, zp, sc, PER_UNIT) * x1)
                + (_code(u, 2, 2, zp, sc, PER_UNIT) * x2 + _code(u, 3, 2, zp, sc, PER_UNIT) * x3))
    else:
        x_even, x_odd = tl.split(xr)  # [..., U, 2, 2]: codes 0, 2, 4, 6 and 1, 3, 5, 7
        x04, x26 = tl.split(x_even)  # [..., U, 2]
        x15, x37 = tl.split(x_odd)
        x0, x4 = tl.split(x04)
        x2, x6 = tl.split(x26)
        x1, x5 = tl.split(x15)
        x3, x7 = tl.split(x37)
        return (((_code(u, 0, 3, zp, sc, PER_UNIT) * x0 + _code(u, 1, 3, zp, sc, PER_UNIT) * x1)
                 + (_code(u, 2, 3, zp, sc, PER_UNIT) * x2 + _code(u, 3, 3, zp, sc, PER_UNIT) * x3))
                + ((_code(u, 4, 3, zp, sc, PER_UNIT) * x4 + _code(u, 5, 3, zp, sc, PER_UNIT) * x5)
                   + (_code(u, 6, 3, zp, sc, PER_UNIT) * x6 + _code(u, 7, 3, zp, sc, PER_UNIT) * x7)))


@triton.jit
def _code_x(x, A: tl.constexpr, U: tl.constexpr, BITS: tl.constexpr):
    """``x`` (``A * U * C`` values, ``C`` codes a unit) as :func:`_codes_dot` takes it:
    ``[1, A, U, 2, ...]``, or ``[1, U, 2, ...]`` for ``A = 0``."""
    if A == 0:
        if BITS == 4:
            return tl.reshape(x, (1, U, 2))
        elif BITS == 2:
            return tl.reshape(x, (1, U, 2, 2))
        else:
            return tl.reshape(x, (1, U, 2, 2, 2))
    else:
        if BITS == 4:
            return tl.reshape(x, (1, A, U, 2))
        elif BITS == 2:
            return tl.reshape(x, (1, A, U, 2, 2))
        else:
            return tl.reshape(x, (1, A, U, 2, 2, 2))


@triton.jit
def _int3_units_of_bytes(w_ptr, offs_u, mask, sw_k):
    """int3's 24-bit units (uint32) from their three bytes each (``offs_u``: unit indices; ``sw_k`` the
    stride of a byte): the fallback read, a byte at a time."""
    b0 = tl.load(w_ptr + (3 * offs_u) * sw_k, mask=mask, other=0).to(tl.uint32)
    b1 = tl.load(w_ptr + (3 * offs_u + 1) * sw_k, mask=mask, other=0).to(tl.uint32)
    b2 = tl.load(w_ptr + (3 * offs_u + 2) * sw_k, mask=mask, other=0).to(tl.uint32)
    return b0 | (b1 << 8) | (b2 << 16)


@triton.jit
def _int3_units_of_words(w_ptr, offs_m, mask):
    """int3's 24-bit units from 32-bit words: ``offs_m [..., M]`` indexes runs of four units (12 bytes,
    three little-endian words ``w0 w1 w2`` whose 96 bits hold units ``u0..u3`` at bits ``24i``), read a
    word at a time (``w_ptr`` 4-byte aligned, bytes contiguous: :func:`_group_tiles` checks both) ->
    ``[..., 4M]`` units in order."""
    p = w_ptr.to(tl.pointer_type(tl.uint32)) + 3 * offs_m
    w0 = tl.load(p, mask=mask, other=0)
    w1 = tl.load(p + 1, mask=mask, other=0)
    w2 = tl.load(p + 2, mask=mask, other=0)
    u0 = w0 & 0xFFFFFF
    u1 = (w0 >> 24) | ((w1 & 0xFFFF) << 8)
    u2 = (w1 >> 16) | ((w2 & 0xFF) << 16)
    u3 = w2 >> 8
    u = tl.join(tl.join(u0, u2), tl.join(u1, u3))  # [..., M, 2, 2]: u[..., m, a, b] = unit 4m + 2a + b
    return tl.reshape(u, (u.shape[0], u.shape[1], 4 * u.shape[2]))


@triton.jit
def _packed_row_dots(w_ptr, sc_ptr, zp_ptr, rows, mask_n, x_ptr, k0, n_in, sw_n, sw_k, ss_n, ss_g, group,
                     BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """:func:`_row_dots` on packed codes (int4, int3, int2: ``BITS``): ``W[r, c] = (code - z) * s``. A row
    is a little-endian bit stream of ``BITS``-bit codes in *units* of ``C`` codes: a byte of 2 (int4,
    code ``2b`` in the low nibble of byte ``b``) or 4 (int2), or three bytes of 8 (int3); ``sw_k`` is the
    stride of a byte. A step reads its ``BK/C`` units a row once and ``x[k0:k0+BK]`` once, split by
    code position. With ``GROUP`` (a power of two dividing BK, and a multiple of 32 for int3) the units
    are read as ``[BN, BK/G, G/C]``, and a group's scale and zero point are loaded once a row and applied
    to its two partial sums, ``s (sum c x - z sum x)``; int3 reads them as 32-bit words there (four
    units in three words). Otherwise (``GROUP = 0``; a group holds whole units) every unit reads its own
    scale and zero point, and int3 its three bytes one by one."""
    C: tl.constexpr = 8 if BITS == 3 else 8 // BITS  # codes a unit
    if GROUP > 0:
        offs_g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)  # [BK/G] group index
        mask_b = offs_g[None, :, None] * GROUP < n_in  # whole groups (constant along a group's bytes: wide loads)
        offs_x = k0 + tl.arange(0, BLOCK_K // GROUP)[None, :, None] * GROUP + tl.arange(0, GROUP)[None, None, :]
        x3 = tl.load(x_ptr + offs_x, mask=offs_x < n_in, other=0.0).to(tl.float32)  # [1, BK/G, G]
        row_ptr = w_ptr + rows[:, None, None] * sw_n  # [BN, 1, 1]
        m3 = mask_n[:, None, None] & mask_b
        if BITS == 3:
            offs_m = offs_g[None, :, None] * (GROUP // 32) + tl.arange(0, GROUP // 32)[None, None, :]  # [1, BK/G, G/32]
            u = _int3_units_of_words(row_ptr, offs_m, m3)  # [BN, BK/G, G/8] uint32
        else:
            offs_b = offs_g[None, :, None] * (GROUP // C) + tl.arange(0, GROUP // C)[None, None, :]  # [1, BK/G, G/C]
            u = tl.load(row_ptr + offs_b * sw_k, mask=m3, other=0)  # [BN, BK/G, G/C] uint8
        cx = tl.reduce(_codes_dot(u, _code_x(x3, BLOCK_K // GROUP, GROUP // C, BITS), 0.0, 0.0, BITS, False), 2, _SUM)  # [BN, BK/G]
        xs = tl.reduce(x3, 2, _SUM)  # [1, BK/G] sum of x over each group
        gm = mask_n[:, None] & (offs_g[None, :] * GROUP < n_in)
        sc = tl.load(sc_ptr + rows[:, None] * ss_n + offs_g[None, :] * ss_g, mask=gm, other=0.0).to(tl.float32)
        zp = tl.load(zp_ptr + rows[:, None] * ss_n + offs_g[None, :] * ss_g, mask=gm, other=0.0).to(tl.float32)
        return tl.reduce((cx - zp * xs) * sc, 1, _SUM)
    else:
        offs_u = k0 // C + tl.arange(0, BLOCK_K // C)  # [BK/C] units: columns C*u .. C*u + C - 1
        mask_u = offs_u < n_in // C
        offs_x = k0 + tl.arange(0, BLOCK_K)  # [BK]
        x = tl.load(x_ptr + offs_x, mask=offs_x < n_in, other=0.0).to(tl.float32)
        m2 = mask_n[:, None] & mask_u[None, :]
        row_ptr = w_ptr + rows[:, None] * sw_n  # [BN, 1]
        if BITS == 3:
            u = _int3_units_of_bytes(row_ptr, offs_u[None, :], m2, sw_k)  # [BN, BK/8] uint32
        else:
            u = tl.load(row_ptr + offs_u[None, :] * sw_k, mask=m2, other=0)  # [BN, BK/C] uint8
        g_off = rows[:, None] * ss_n + (offs_u[None, :] * C // group) * ss_g  # [BN, BK/C] each unit's group
        sc = tl.load(sc_ptr + g_off, mask=m2, other=0.0).to(tl.float32)
        zp = tl.load(zp_ptr + g_off, mask=m2, other=0.0).to(tl.float32)
        xr = _code_x(x, 0, BLOCK_K // C, BITS)  # [1, BK/C, 2, ...]
        return tl.reduce(_codes_dot(u, xr, zp, sc, BITS, True), 1, _SUM)


@triton.jit
def _row_dots(w_ptr, sc_ptr, zp_ptr, rows, mask_n, x_ptr, k0, n_in, sw_n, sw_k, ss_n, ss_g, group,
              QUANT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One loop step of ``W[rows] @ x``: ``sum over k in [k0, k0 + BK) of W[rows, k] * x[k]``, float32
    ``[BN]``. ``QUANT``: 0 float weights; 8 int8, ``W = q * scale``; 4, 3, 2 int4, int3, int2
    (:func:`_packed_row_dots`).
    With ``GROUP`` (a power of two dividing BK, each scale's group) the tile is read as ``[BN, BK/G, G]``
    and each scale multiplies its group's partial sum, one load per (row, group); otherwise
    (``GROUP = 0``) every weight reads its own scale."""
    if QUANT == 4 or QUANT == 3 or QUANT == 2:
        return _packed_row_dots(w_ptr, sc_ptr, zp_ptr, rows, mask_n, x_ptr, k0, n_in, sw_n, sw_k, ss_n, ss_g, group,
                                QUANT, GROUP, BLOCK_N, BLOCK_K)
    elif QUANT and GROUP > 0:
        offs3 = k0 + tl.arange(0, BLOCK_K // GROUP)[None, :, None] * GROUP + tl.arange(0, GROUP)[None, None, :]
        mask3 = offs3 < n_in  # [1, BK/G, G]
        x3 = tl.load(x_ptr + offs3, mask=mask3, other=0.0).to(tl.float32)
        w3 = tl.load(w_ptr + rows[:, None, None] * sw_n + offs3 * sw_k, mask=mask_n[:, None, None] & mask3,
                     other=0).to(tl.float32)  # [BN, BK/G, G]
        part = tl.reduce(w3 * x3, 2, _SUM)  # [BN, BK/G]
        offs_g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)  # [BK/G] group index
        sc = tl.load(sc_ptr + rows[:, None] * ss_n + offs_g[None, :] * ss_g,
                     mask=mask_n[:, None] & (offs_g[None, :] * GROUP < n_in), other=0.0).to(tl.float32)
        return tl.reduce(part * sc, 1, _SUM)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < n_in
        x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        m2 = mask_n[:, None] & mask_k[None, :]
        w = tl.load(w_ptr + rows[:, None] * sw_n + offs_k[None, :] * sw_k, mask=m2, other=0.0).to(tl.float32)
        if QUANT:
            w = w * tl.load(sc_ptr + rows[:, None] * ss_n + (offs_k[None, :] // group) * ss_g, mask=m2,
                            other=0.0).to(tl.float32)
        return tl.reduce(w * x[None, :], 1, _SUM)


@triton.jit
def _gate_up_kernel(
    x_ptr, ids_ptr, w_ptr, sc_ptr, zp_ptr, b_ptr, h_ptr,
    S, H, N_I, K, group,  # N_I: intermediate size (I)
    stride_x, sw_s, sw_n, sw_k, ss_s, ss_n, ss_g, sb_s,
    up_row, gate_step, alpha, limit,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr,
    INTERLEAVED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    j = tl.program_id(0)  # term
    pid_n = tl.program_id(1)
    s = tl.load(ids_ptr + j).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] intermediate index
    mask_n = offs_n < N_I
    gate = tl.full([BLOCK_N], 0.0, tl.float32)
    up = tl.full([BLOCK_N], 0.0, tl.float32)
    if (s >= 0) & (s < S):  # a skipped term reads nothing
        x_base = x_ptr + (j // K) * stride_x
        w_base = w_ptr + s * sw_s
        sc_base = sc_ptr + s * ss_s
        zp_base = zp_ptr + s * ss_s  # zero points: laid out as the scales
        if INTERLEAVED:  # gate and up rows alternate: read both as one contiguous [2BN] block of rows
            rows2 = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)  # [2BN] gate0, up0, gate1, up1, ...
            mask2 = rows2 < 2 * N_I
            both = tl.full([2 * BLOCK_N], 0.0, tl.float32)
            for k0 in range(0, H, BLOCK_K):
                both += _row_dots(w_base, sc_base, zp_base, rows2, mask2, x_base, k0, H, sw_n, sw_k, ss_n, ss_g,
                                  group, QUANT, GROUP, 2 * BLOCK_N, BLOCK_K)
            if HAS_BIAS:
                both += tl.load(b_ptr + s * sb_s + rows2, mask=mask2, other=0.0).to(tl.float32)
            gate, up = tl.split(tl.reshape(both, (BLOCK_N, 2)))  # [BN], [BN]
        else:
            rows_g = offs_n * gate_step  # [BN] stored row of the gate half
            rows_u = up_row + offs_n * gate_step  # [BN] stored row of the up half
            for k0 in range(0, H, BLOCK_K):
                gate += _row_dots(w_base, sc_base, zp_base, rows_g, mask_n, x_base, k0, H, sw_n, sw_k, ss_n, ss_g,
                                  group, QUANT, GROUP, BLOCK_N, BLOCK_K)
                up += _row_dots(w_base, sc_base, zp_base, rows_u, mask_n, x_base, k0, H, sw_n, sw_k, ss_n, ss_g,
                                group, QUANT, GROUP, BLOCK_N, BLOCK_K)
            if HAS_BIAS:
                gate += tl.load(b_ptr + s * sb_s + rows_g, mask=mask_n, other=0.0).to(tl.float32)
                up += tl.load(b_ptr + s * sb_s + rows_u, mask=mask_n, other=0.0).to(tl.float32)
    if ACT == 0:
        act = gate / (1.0 + tl.exp(-gate)) * up
    else:
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        act = (u + 1.0) * (g / (1.0 + tl.exp(-alpha * g)))
    tl.store(h_ptr + j * N_I + offs_n, act, mask=mask_n)  # a skipped term's row: act(0, 0) = 0, never read


@triton.jit
def _down_kernel(
    h_ptr, ids_ptr, tw_ptr, w_ptr, sc_ptr, zp_ptr, b_ptr, out_ptr,
    S, H, N_I, K, group,  # N_I: intermediate size (I)
    stride_o, sw_s, sw_n, sw_k, ss_s, ss_n, ss_g, sb_s,
    HAS_BIAS: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0)  # token
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] hidden index
    mask_n = offs_n < H
    acc = tl.full([BLOCK_N], 0.0, tl.float32)
    for kk in range(0, K):
        j = t * K + kk
        s = tl.load(ids_ptr + j).to(tl.int64)
        if (s >= 0) & (s < S):  # a skipped term reads nothing and adds nothing
            w_base = w_ptr + s * sw_s
            sc_base = sc_ptr + s * ss_s
            zp_base = zp_ptr + s * ss_s
            part = tl.full([BLOCK_N], 0.0, tl.float32)
            for i0 in range(0, N_I, BLOCK_K):
                part += _row_dots(w_base, sc_base, zp_base, offs_n, mask_n, h_ptr + j * N_I, i0, N_I, sw_n, sw_k,
                                  ss_n, ss_g, group, QUANT, GROUP, BLOCK_N, BLOCK_K)
            if HAS_BIAS:
                part += tl.load(b_ptr + s * sb_s + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += tl.load(tw_ptr + j).to(tl.float32) * part
    tl.store(out_ptr + t * stride_o + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and warps of the two kernels (see :func:`default_blocks`): ``*_n`` output rows per
    program, ``*_k`` input columns per loop step."""

    gate_up_n: int = 16
    gate_up_k: int = 256
    gate_up_warps: int = 4
    down_n: int = 8
    down_k: int = 1024
    down_warps: int = 4


def default_blocks(num_terms: int, hidden: int, inter: int, transposed: bool = False, bits: int = 0) -> Blocks:
    """Tiles for a decode call. Batch-1 decode reads each chosen expert once and does two flops per
    weight, so both kernels are bound by memory, and by Little's law the bytes in flight must cover
    bandwidth x latency (3.8 TB/s x ~0.7 us ~ 2.7 MB on an H200). Small output blocks spread a step's
    reads over more programs than the GPU has multiprocessors (132 on an H200): the gate/up kernel runs
    ``J * I / gate_up_n`` programs with ``2 * gate_up_n * gate_up_k`` weights in flight each (J*2I*256*2
    bytes = 8 MB for OLMoE's shape at T=1); the down kernel ``T * H / down_n`` programs with
    ``down_n * down_k`` each, ``T * H * down_k * 2`` bytes in all (4 MB at H=2048), hence the long step.
    In the transposed layout (gpt-oss) the output dim is the contiguous one: the down kernel takes 16
    rows a program so that its loads are 16 bytes wide (8 rows gave 8-byte loads; checked in the SASS of
    an sm_90 build). int4 (``bits=4``) holds half a byte a weight: its gate/up step takes 512 columns, the
    bytes a row that int8 reads in 256 (no spills, 16-byte loads in an sm_90 build); its down step keeps
    1024 columns, a whole row of I <= 1024. int3 and int2 (``bits`` 3, 2) keep
    int4's tiles: int2's 512 columns are 128 bytes a row, int3's 192 (in sm_90 builds 126 and 96 registers a
    thread at 512 columns, 128 and 126 at 1024, no spills either way: the sweep decides). Chosen by reasoning, to be replaced by the sweep of benchmarks/fused_moe.py
    (which has not run on a GPU for any format)."""
    del num_terms, hidden, inter  # one choice for the decode shapes measured so far (benchmarks/fused_moe.py)
    if bits in UNITS:
        return Blocks(gate_up_k=512)
    return Blocks(down_n=16, down_k=512) if transposed else Blocks()


def _strides(w: torch.Tensor, transposed: bool) -> tuple[int, int, int]:
    """(slot, output row, input col) strides of a ``[S, out, in]`` (or transposed ``[S, in, out]``) tensor."""
    return (w.stride(0), w.stride(2), w.stride(1)) if transposed else (w.stride(0), w.stride(1), w.stride(2))


def _scale_args(q: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None,
                cols: int) -> tuple[torch.Tensor, torch.Tensor, int, int, int, int]:
    """(scale pointer, zero-point pointer, values per scale along the input dim of ``cols`` values,
    slot/row/group strides of both, which :func:`check_quantised` made sure are one set); dummy pointers
    and zeros when unquantised (no zero point: the scale's pointer, never read)."""
    if scale is None:
        return q, q, 1, 0, 0, 0
    return (scale, scale if zero is None else zero, cols // scale.shape[-1],
            scale.stride(0), scale.stride(1), scale.stride(2))


def _group_tiles(scale: torch.Tensor | None, group: int, block_k: int, q: torch.Tensor | None = None,
                 bits: int = 8) -> int:
    """The kernels' ``GROUP``: the scale group when a loop step holds whole groups of a power-of-two
    size (one scale load per row and group), else 0 (a scale load per weight). int3 (``bits=3``, codes
    ``q``) reads its groups as 32-bit words: only where a group is whole words (a multiple of 32 codes)
    and the bytes are contiguous and every row starts 4-byte aligned (swapmoe's slots at G=64 are)."""
    if scale is None or group & (group - 1) or block_k % group:
        return 0
    if bits == 3 and (q is None or group % 32 or q.stride(-1) != 1 or q.data_ptr() % 4
                      or any(st % 4 for st in q.stride()[:-1])):
        return 0
    return group


def _quant(scale: torch.Tensor | None, bits: int) -> int:
    """The kernels' ``QUANT``: 0 for float weights, else the bits of a code."""
    return 0 if scale is None else bits


def check_quantised(ex: ExpertTensors) -> None:
    """Raise ValueError where a projection's quantised parts are not ones the kernels read (see
    :class:`ExpertTensors`; swapmoe.fused refuses such modules before any call)."""
    if ex.transposed and (ex.gate_up_scale is not None or ex.down_scale is not None):
        raise ValueError("quantised weights are read in the [S, out, in] layout only")
    if ex.bits not in QUANT_BITS:
        raise ValueError(f"codes of {ex.bits} bits: the kernels read int8, int4, int3 or int2 (bits=8, 4, 3, 2)")
    for name, q, sc, zp in (("gate_up", ex.gate_up, ex.gate_up_scale, ex.gate_up_zero),
                            ("down", ex.down, ex.down_scale, ex.down_zero)):
        if sc is None or ex.bits == 8:
            if zp is not None:
                raise ValueError(f"{name} has zero points: only int4, int3 and int2 (bits 4, 3, 2, with scales) "
                                 "have them")
            continue
        fmt = f"int{ex.bits}"
        if zp is None or zp.shape != sc.shape or zp.stride() != sc.stride():
            raise ValueError(f"{fmt} {name} needs zero points laid out as its scales (swapmoe.quant's parts)")
        codes, nbytes = UNITS[ex.bits]
        cols = q.shape[-1] * codes // nbytes
        if q.dtype != torch.uint8 or q.shape[-1] % nbytes or cols % sc.shape[-1] or (cols // sc.shape[-1]) % codes:
            raise ValueError(f"{fmt} {name}: want uint8 bytes of {codes} codes in {nbytes} and groups of whole "
                             f"bytes (swapmoe.quant's {fmt} parts), got {q.dtype} with {q.shape[-1]} bytes a row "
                             f"in {sc.shape[-1]} groups")


def gate_up_act(hidden: torch.Tensor, ids: torch.Tensor, ex: ExpertTensors, act: int = ACT_SILU,
                alpha: float = 1.702, limit: float = 7.0, blocks: Blocks | None = None) -> torch.Tensor:
    """The first kernel: ``h [J, I]`` float32, ``h[j] = act(gate_up[s_j] @ x_t (+ b))`` (0 for a skipped term)."""
    T, K = ids.shape
    H, N_I = ex.dims()
    b = blocks or default_blocks(T * K, H, N_I, ex.transposed, bits=ex.packed_bits)
    x = hidden.contiguous()
    h = torch.empty((T * K, N_I), dtype=torch.float32, device=hidden.device)  # [J, I]
    up_row, step = (1, 2) if ex.interleaved else (N_I, 1)
    sc, zp, group, *sc_s = _scale_args(ex.gate_up, ex.gate_up_scale, ex.gate_up_zero, H)
    bias = ex.gate_up_bias if ex.gate_up_bias is not None else ex.gate_up  # a dummy pointer when unused
    _gate_up_kernel[(T * K, triton.cdiv(N_I, b.gate_up_n))](
        x, ids.reshape(-1).contiguous(), ex.gate_up, sc, zp, bias, h,
        ex.num_slots, H, N_I, K, group,
        x.stride(0), *_strides(ex.gate_up, ex.transposed), *sc_s,
        bias.stride(0) if ex.gate_up_bias is not None else 0,
        up_row, step, float(alpha), float(limit),
        ACT=act, HAS_BIAS=ex.gate_up_bias is not None, QUANT=_quant(ex.gate_up_scale, ex.bits),
        GROUP=_group_tiles(ex.gate_up_scale, group, b.gate_up_k, ex.gate_up, ex.bits), INTERLEAVED=ex.interleaved, BLOCK_N=b.gate_up_n, BLOCK_K=b.gate_up_k, num_warps=b.gate_up_warps,
    )
    return h


def down_sum(h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, ex: ExpertTensors, dtype: torch.dtype,
             blocks: Blocks | None = None) -> torch.Tensor:
    """The second kernel: ``out [T, H]`` in ``dtype``, ``out[t] = sum_k w_tk * (down[s_tk] @ h[tk] (+ b))``."""
    T, K = ids.shape
    H, N_I = ex.dims()
    b = blocks or default_blocks(T * K, H, N_I, ex.transposed, bits=ex.packed_bits)
    out = torch.empty((T, H), dtype=dtype, device=h.device)  # [T, H]
    sc, zp, group, *sc_s = _scale_args(ex.down, ex.down_scale, ex.down_zero, N_I)
    bias = ex.down_bias if ex.down_bias is not None else ex.down
    _down_kernel[(T, triton.cdiv(H, b.down_n))](
        h, ids.reshape(-1).contiguous(), weights.reshape(-1).contiguous(), ex.down, sc, zp, bias, out,
        ex.num_slots, H, N_I, K, group,
        out.stride(0), *_strides(ex.down, ex.transposed), *sc_s,
        bias.stride(0) if ex.down_bias is not None else 0,
        HAS_BIAS=ex.down_bias is not None, QUANT=_quant(ex.down_scale, ex.bits),
        GROUP=_group_tiles(ex.down_scale, group, b.down_k, ex.down, ex.bits), BLOCK_N=b.down_n, BLOCK_K=b.down_k, num_warps=b.down_warps,
    )
    return out


def fused_experts(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, ex: ExpertTensors,
                  act: int = ACT_SILU, alpha: float = 1.702, limit: float = 7.0,
                  blocks: Blocks | None = None) -> torch.Tensor:
    """``out[t] = sum_k weights[t, k] * expert_{ids[t, k]}(hidden[t])`` over the slot tensors ``ex``.

    ``hidden [T, H]``, ``ids [T, K]`` slot ids (``>= S`` or negative: skipped, nothing read),
    ``weights [T, K]``. Returns ``[T, H]`` in ``hidden``'s dtype. ``alpha``/``limit``: gpt-oss's
    activation constants (``act=ACT_GPT_OSS``).
    """
    check_quantised(ex)
    h = gate_up_act(hidden, ids, ex, act, alpha, limit, blocks)  # [J, I]
    return down_sum(h, ids, weights, ex, hidden.dtype, blocks)  # [T, H]
