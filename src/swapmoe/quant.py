"""Weight-only, group-wise quantisation of expert weights: pure functions, no state.

Formats (``--expert-dtype`` / ``swapmoe.load(expert_dtype=...)``)
    bf16  each per-expert matrix stored as bfloat16 (a cast: no scales); a no-op on a bf16 model
    int8  symmetric: per group of ``G`` consecutive values along the last dim, ``s = absmax / 127``
          (float16), ``q = round(w / s)`` in ``[-127, 127]`` (int8); ``w' = q * s``
    int4  asymmetric: per group, ``s = (max - min) / 15`` and ``z = -min / s`` (both float16),
          ``q = clamp(round(w / s + z), 0, 15)``, two values per byte along the last dim (low nibble
          first); ``w' = (q - z) * s``
    int3  asymmetric as int4 with ``2**3 - 1 = 7`` steps; eight codes in three bytes (a little-endian
          24-bit word, code ``i`` in bits ``3i..3i+2``); the zero point refined as HQQ does (below)
    int2  asymmetric as int4 with 3 steps; four codes per byte (code ``i`` in bits ``2i..2i+1``);
          the zero point refined as HQQ does

``G`` is :data:`GROUP_SIZE` where the last dim is a multiple of it, else the whole row. Per-expert
tensors of one dimension (biases, ``[E, N]``) are kept as they are: they are a sliver of the bytes,
and a bias error is not averaged away by a dot product.

Why these choices: 64 is HQQ's default group (mixtral-offloading's 4-bit attention); float16 scales
and zero points as GPTQ/HQQ/AWQ store them (10 mantissa bits, where bfloat16 has 7); a float zero
point (HQQ) maps the group's minimum exactly. Scales are rounded to float16 *before* ``q`` is
computed, so ``q`` is the best code for the scale that is stored. A group whose scale underflows
float16 (``absmax < 127 * 2**-24``) stores ``s = 1`` and ``q = 0``: its values are below ``1e-5``.

Bytes per weight: bf16 2, int8 ``1 + 2/G`` (1.031 at G=64), int4 ``0.5 + 4/G`` (0.5625), int3
``0.375 + 4/G`` (0.4375), int2 ``0.25 + 4/G`` (0.3125): a byte budget holds 1.94x (int8), 3.56x (int4),
4.57x (int3) or 6.4x (int2) as many bfloat16 experts.

The zero point of int3 and int2 (HQQ, Badri & Shaji 2023; mixtral-offloading's 2-3 bit experts): with
so few steps, the minimum-maximum zero point wastes codes on outliers. Starting from it, ``_ITERS``
half-quadratic steps move ``z`` towards the value that minimises an ``lp`` (``p = 0.7``) norm of the
error, which lets a few outliers be clipped; each group keeps the zero point of the step with its
lowest mean absolute error (so never worse than the start, and a group's result does not depend on
which other groups are quantised with it). The scale stays ``(max - min) / steps``. It needs no
calibration data. ``benchmarks/lowbit_formats.py`` measured it against plain round-to-nearest and
other group sizes on the reference model (docs/quantization.md).

    E = experts (or S slots, or C gathered experts), N = last dim of a weight, G = group size
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from swapmoe.errors import SwapMoEError

#: every format, from the most bytes per weight to the fewest (the planner and ``quantized-all`` rely on it)
FORMATS = ("bf16", "int8", "int4", "int3", "int2")
#: values per scale: HQQ's default group size (see the module docstring)
GROUP_SIZE = 64
_SCALE_DTYPE = torch.float16
_QMAX = {"int8": 127, "int4": 15, "int3": 7, "int2": 3}
#: bits per code of the asymmetric (scale and zero point) formats
PACKED_BITS = {"int4": 4, "int3": 3, "int2": 2}
#: codes per packed unit, and bytes per unit: int4 and int2 fill one byte, int3 eight codes fill three
PACKED_UNITS = {"int4": (2, 1), "int3": (8, 3), "int2": (4, 1)}
#: formats whose zero point is refined (HQQ); int4 keeps the plain min-max zero point (its test figures)
_REFINED = ("int3", "int2")
#: HQQ's defaults (hqq.core.optimize: lp_norm 0.7, beta 10, kappa 1.01, 20 iterations)
_LP, _BETA, _KAPPA, _ITERS = 0.7, 10.0, 1.01, 20
#: values per chunk of :func:`refine_zero` on the CPU, fewer than torch's intra-op grain (32768), so
#: each operation runs on its calling thread: the chunks are spread over ``torch.get_num_threads()``
#: threads of our own instead. Many small operations each split over OpenMP threads slowed ~15x on a
#: busy machine (every barrier waits for a descheduled thread); five arrays of a chunk take 640 KiB,
#: within a core's L2 cache, where full-size temporaries go to memory at every operation
CPU_CHUNK_VALUES = 32767
#: values of a weight quantised at a time on another device (:meth:`ExpertLayout.encode`): quantise holds
#: up to ~8 float32 arrays of a chunk's size at once (the groups, :func:`refine_zero`'s four buffers,
#: the codes' temporaries), so a chunk of 8M values bounds the transient device memory to ~256 MiB
DEVICE_CHUNK_VALUES = 1 << 23


def parse_expert_dtype(value: str | None, model_dtype: torch.dtype) -> str | None:
    """The quantisation format for ``--expert-dtype``, or None where experts stay as the model holds
    them (no value, or ``bf16`` on a bfloat16 model): then nothing in the load changes."""
    if value is None:
        return None
    name = str(value).strip().lower().replace("bfloat16", "bf16")
    if name not in FORMATS:
        raise SwapMoEError(f"unknown expert dtype {value!r}: choose one of {', '.join(FORMATS)} "
                           "(--expert-dtype, expert_dtype=)")
    if name == "bf16" and model_dtype == torch.bfloat16:
        return None
    return name


def expert_dtypes_per_layer(value: str | Sequence[str | None] | None, num_layers: int,
                            model_dtype: torch.dtype) -> list[str | None]:
    """One format per MoE layer (each as :func:`parse_expert_dtype` gives it) from ``expert_dtype=``:
    one format for every layer, or a list with one entry per MoE layer (None: as the model holds it)."""
    if value is None or isinstance(value, str):
        return [parse_expert_dtype(value, model_dtype)] * num_layers
    check_expert_dtypes(value, num_layers)
    return [parse_expert_dtype(v, model_dtype) for v in value]


def check_expert_dtypes(value: str | Sequence[str | None] | None, num_layers: int | None = None,
                        where: str = "expert_dtype") -> None:
    """Raise a one-line :class:`SwapMoEError` where ``value`` is not a format, or not a list of formats
    (or None) with one entry per MoE layer (``num_layers``; None: any non-empty length)."""
    if value is None:
        return
    if isinstance(value, str):
        parse_expert_dtype(value, torch.float32)
        return
    if not isinstance(value, (list, tuple)) or not value:
        raise SwapMoEError(f"{where} must be one of {', '.join(FORMATS)} or a non-empty list of them, one per "
                           f"MoE layer; got {value!r}")
    if num_layers is not None and len(value) != num_layers:
        raise SwapMoEError(f"{where} lists {len(value)} formats for {num_layers} MoE layers: give one per MoE layer")
    for i, v in enumerate(value):
        if v is not None and (not isinstance(v, str) or str(v).strip().lower().replace("bfloat16", "bf16")
                              not in FORMATS):
            raise SwapMoEError(f"{where}[{i}] is {v!r}: each entry must be one of {', '.join(FORMATS)} "
                               "(or null: the model's dtype)")


def group_size(n: int, group: int = GROUP_SIZE) -> int:
    """Values per scale along a last dim of ``n``: ``group`` where it divides ``n``, else the row."""
    return group if n % group == 0 else n


def quantised(shape: tuple[int, ...]) -> bool:
    """Is a per-expert tensor of this shape (without the expert dim) quantised? Matrices are; biases not."""
    return len(shape) >= 2


def part_specs(shape: tuple[int, ...], fmt: str, group: int = GROUP_SIZE) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each stored part of one ``shape`` weight (any leading dims) in ``fmt``."""
    *lead, n = shape
    if fmt == "bf16":
        return {"q": (tuple(shape), torch.bfloat16)}
    g = n // group_size(n, group)
    if fmt == "int8":
        return {"q": (tuple(shape), torch.int8), "scale": ((*lead, g), _SCALE_DTYPE)}
    if fmt in PACKED_BITS:
        codes, nbytes = PACKED_UNITS[fmt]
        if n % codes:
            raise SwapMoEError(f"{fmt} packs {codes} values into {nbytes} byte{'s' if nbytes > 1 else ''} and needs a "
                               f"last dim that is a multiple of {codes}, got {n}; use --expert-dtype int8")
        return {"q": ((*lead, n // codes * nbytes), torch.uint8), "scale": ((*lead, g), _SCALE_DTYPE),
                "zero": ((*lead, g), _SCALE_DTYPE)}
    raise ValueError(f"unknown format {fmt!r}")


def pack(q: torch.Tensor, fmt: str) -> torch.Tensor:
    """Codes ``[..., N]`` (integers in ``[0, 2**bits)``) -> bytes ``[..., N * bits / 8]`` uint8."""
    bits = PACKED_BITS[fmt]
    codes, nbytes = PACKED_UNITS[fmt]
    if nbytes == 1:  # int4, int2: code i of a byte in bits [bits*i, bits*(i+1))
        q = q.to(torch.uint8)
        out = q[..., 0::codes]
        for i in range(1, codes):
            out = out | (q[..., i::codes] << (bits * i))
        return out
    u = q.to(torch.int32).reshape(*q.shape[:-1], q.shape[-1] // codes, codes)  # [..., N/8, 8]
    word = u[..., 0]
    for i in range(1, codes):
        word = word | (u[..., i] << (bits * i))  # a 24-bit little-endian word per 8 codes
    out = torch.stack([(word >> (8 * j)) & 255 for j in range(nbytes)], -1)  # [..., N/8, 3]
    return out.to(torch.uint8).reshape(*q.shape[:-1], q.shape[-1] // codes * nbytes)


def unpack(b: torch.Tensor, fmt: str) -> torch.Tensor:
    """Bytes from :func:`pack` -> codes ``[..., N]`` as float32."""
    bits = PACKED_BITS[fmt]
    codes, nbytes = PACKED_UNITS[fmt]
    mask = (1 << bits) - 1
    if nbytes == 1:
        x = torch.empty((*b.shape, codes), dtype=torch.float32, device=b.device)  # [..., N/codes, codes]
        for i in range(codes):
            x[..., i] = (b >> (bits * i)) & mask
        return x.reshape(*b.shape[:-1], b.shape[-1] * codes)
    u = b.to(torch.int32).reshape(*b.shape[:-1], b.shape[-1] // nbytes, nbytes)  # [..., N/8, 3]
    word = u[..., 0] | (u[..., 1] << 8) | (u[..., 2] << 16)  # [..., N/8]
    x = torch.stack([(word >> (bits * i)) & mask for i in range(codes)], -1)  # [..., N/8, 8]
    return x.to(torch.float32).reshape(*b.shape[:-1], b.shape[-1] // nbytes * codes)


def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """``[..., N]`` -> ``[..., N/G, G]`` float32."""
    n = w.shape[-1]
    g = group_size(n, group)
    return w.float().reshape(*w.shape[:-1], n // g, g)


def _stored_scale(s: torch.Tensor) -> torch.Tensor:
    """The scale as stored (float16); an empty or underflowing group gets 1 (its codes are 0)."""
    s16 = s.to(_SCALE_DTYPE)
    return torch.where(s16 == 0, torch.ones_like(s16), s16)


def quantise(w: torch.Tensor, fmt: str, group: int = GROUP_SIZE, refine: bool | None = None) -> dict[str, torch.Tensor]:
    """Weight ``w [..., N]`` -> its parts in ``fmt`` (see the module docstring and :func:`part_specs`).

    ``refine``: whether the zero point is refined (HQQ); None: as the format does (int3, int2). The
    runtime always uses the default; the option is there to measure the choice."""
    if fmt == "bf16":
        return {"q": w.to(torch.bfloat16)}
    x = _groups(w, group)  # [..., N/G, G]
    if fmt == "int8":
        s = _stored_scale(x.abs().amax(-1) / _QMAX[fmt])  # [..., N/G]
        q = torch.round(x / s.float().unsqueeze(-1)).clamp(-_QMAX[fmt], _QMAX[fmt])
        return {"q": q.to(torch.int8).reshape(w.shape), "scale": s}
    if fmt in PACKED_BITS:
        part_specs(tuple(w.shape), fmt, group)  # a last dim the packing cannot take: a one-line error
        lo, hi = x.amin(-1), x.amax(-1)
        s = _stored_scale((hi - lo) / _QMAX[fmt])
        z = -lo / s.float()
        if (fmt in _REFINED) if refine is None else refine:
            z = refine_zero(x, s.float(), z, _QMAX[fmt])
        z = z.to(_SCALE_DTYPE)
        q = torch.round(x / s.float().unsqueeze(-1) + z.float().unsqueeze(-1)).clamp(0, _QMAX[fmt])
        return {"q": pack(q.reshape(w.shape), fmt), "scale": s, "zero": z}
    raise ValueError(f"unknown format {fmt!r}")


def refine_zero(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int, iters: int = _ITERS,
                chunk_values: int | None = None) -> torch.Tensor:
    """HQQ's zero point (see the module docstring): groups ``x [..., N/G, G]``, stored scales and
    min-max zero points ``[..., N/G]`` -> refined zero points ``[..., N/G]`` (float32).

    Half-quadratic splitting of ``min ||x - (q - z) s||_p`` (``p < 1``): an error term ``e`` takes the
    outliers (a generalised soft threshold), then ``z`` is the mean that fits the rest. Each group
    keeps its best step by mean absolute error, so the result depends on the group alone.

    Groups are independent, so they are refined ``chunk_values`` values at a time (None: on the CPU,
    :data:`CPU_CHUNK_VALUES`, the chunks shared among ``torch.get_num_threads()`` threads; on other
    devices every group at once) through four reused buffers per thread: the same element-wise
    operations and the same per-row reductions as one pass over every group, so the result is
    bit-identical whatever the chunk (tests/test_quant.py), and several times faster on the CPU than
    full-size temporaries (docs/quantization.md, "Quantising at load")."""
    g = x.shape[-1]
    x, s, z = x.detach(), s.detach(), z.detach()  # in-place operations refuse autograd (a parameter's weights)
    rows_x, rows_s, rows_z = x.reshape(-1, g), s.reshape(-1, 1), z.reshape(-1, 1)  # [R, G], [R, 1], [R, 1]
    rows = rows_x.shape[0]
    on_cpu = x.device.type == "cpu"
    if chunk_values is None:
        chunk_values = CPU_CHUNK_VALUES if on_cpu else rows * g
    step = max(1, min(rows, chunk_values // g))
    starts = list(range(0, rows, step))
    out = torch.empty((rows, 1), dtype=torch.float32, device=x.device)

    def refine(mine: list[int]) -> None:
        buffers = [torch.empty((step, g), dtype=torch.float32, device=x.device) for _ in range(4)]
        for i in mine:
            j = min(i + step, rows)
            out[i:j] = _refine_rows(rows_x[i:j], rows_s[i:j], rows_z[i:j], qmax, iters,
                                    *(b[:j - i] for b in buffers))

    workers = min(torch.get_num_threads(), len(starts)) if on_cpu else 1
    if workers <= 1:
        refine(starts)
    else:  # torch releases the GIL inside each operation: the threads compute side by side
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(refine, [starts[k::workers] for k in range(workers)]))
    return out.reshape(s.shape)


def _refine_rows(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int, iters: int, q: torch.Tensor,
                 d: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """:func:`refine_zero` of groups ``x [R, G]`` (scales and zero points ``[R, 1]``) in the buffers
    ``q, d, a, t [R, G]``: each step is the textbook expression below, computed in place, operation by
    operation, so that every rounding is the same as when it allocates its temporaries."""
    inv = 1.0 / s  # [R, 1]
    zero = z
    best_zero, best_err = zero, torch.full_like(zero, float("inf"))
    beta = _BETA
    for _ in range(iters):
        torch.mul(x, inv, out=q).add_(zero).round_().clamp_(0, qmax)  # q = round(x / s + z) clamped
        torch.sub(q, zero, out=d).mul_(s)  # the values the codes stand for
        torch.sub(x, d, out=d)  # d = x - (q - z) s
        torch.abs(d, out=a)
        err = a.mean(-1, keepdim=True)  # [R, 1]
        better = err < best_err
        best_zero, best_err = torch.where(better, zero, best_zero), torch.where(better, err, best_err)
        # lp shrinkage: e = sign(d) * relu(|d| - (1 / beta) * (|d| + 1e-8) ** (p - 1))
        torch.add(a, 1e-8, out=t).pow_(_LP - 1).mul_(1.0 / beta)
        torch.sub(a, t, out=t).relu_()
        t.mul_(torch.sign(d, out=a))  # t = e (a is free once |d| is used)
        torch.sub(x, t, out=t).mul_(inv)
        torch.sub(q, t, out=t)  # q - (x - e) / s
        zero = t.mean(-1, keepdim=True)
        beta *= _KAPPA
    return best_zero


def dequantise(parts: Mapping[str, torch.Tensor], fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """Parts from :func:`quantise` -> the weight ``[..., N]`` in ``dtype`` (computed in float32)."""
    q = parts["q"]
    if fmt == "bf16":
        return q.to(dtype)
    s = parts["scale"].float().unsqueeze(-1)  # [..., N/G, 1]
    if fmt == "int8":
        x = q.float()
    elif fmt in PACKED_BITS:
        x = unpack(q, fmt)  # [..., N] codes, a tensor of our own
    else:
        raise ValueError(f"unknown format {fmt!r}")
    n = x.shape[-1]
    x = x.reshape(*q.shape[:-1], s.shape[-2], n // s.shape[-2])  # [..., N/G, G]
    if fmt in PACKED_BITS:
        x = x.sub_(parts["zero"].float().unsqueeze(-1))
    return x.mul_(s).reshape(*q.shape[:-1], n).to(dtype)


class StoredLayout:
    """What every stored layout of a layer's experts shares (:class:`ExpertLayout`, swapmoe.mxfp4's
    ``Mxfp4Layout``): ``shapes``, the model's per-expert tensors (``name -> [E, ...]``), and
    :meth:`parts`, the tensors stored for them; the stores, the slots and swapmoe.qexperts use these."""

    shapes: dict[str, tuple[int, ...]]

    @staticmethod
    def shapes_and_dtypes(tensors: Mapping[str, torch.Tensor]
                          ) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
        return {n: tuple(t.shape) for n, t in tensors.items()}, {n: t.dtype for n, t in tensors.items()}

    @property
    def num_experts(self) -> int:
        return next(iter(self.shapes.values()))[0]

    def parts(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every stored tensor: ``part name -> ([E, ...] shape, dtype)``."""
        raise NotImplementedError

    def expert_bytes(self) -> int:
        """Bytes of one expert as stored: every part (weights or codes, scales, zero points, biases)."""
        return one_expert_bytes(self.parts())


@dataclass(frozen=True)
class ExpertLayout(StoredLayout):
    """How one MoE layer's per-expert tensors are stored in a format.

    ``shapes`` and ``dtypes`` are the model's per-expert tensors (``name -> [E, ...]`` shape, and the
    dtype the model computes in). A quantised tensor ``name`` is stored as parts ``name.q``,
    ``name.scale`` (and ``name.zero``), each ``[E, ...]``; any other keeps its name and dtype. Stores
    and slots hold the parts under these names, so a swap copies every part of an expert.
    """

    fmt: str
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    group: int = GROUP_SIZE

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor], fmt: str, group: int = GROUP_SIZE) -> ExpertLayout:
        return cls(fmt, *cls.shapes_and_dtypes(tensors), group)

    def parts(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every stored tensor: ``part name -> ([E, ...] shape, dtype)``."""
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for name, shape in self.shapes.items():
            if not quantised(shape[1:]):
                out[name] = (shape, self.dtypes[name])
                continue
            for part, spec in part_specs(shape, self.fmt, self.group).items():
                out[f"{name}.{part}"] = spec
        return out

    def encode(self, tensors: Mapping[str, torch.Tensor], compute_device: torch.device | None = None,
               out_device: torch.device | None = None, chunk_values: int = DEVICE_CHUNK_VALUES,
               ) -> dict[str, torch.Tensor]:
        """``name -> [..., *expert shape]`` tensors (all experts, one, or a gathered few) -> their parts.

        ``compute_device``: where the quantisation runs (None: where each tensor is, in one call). Given,
        the weight goes there ``chunk_values`` values at a time (whole rows of its last dim), which
        bounds the transient memory there (:data:`DEVICE_CHUNK_VALUES`). Every group lies within a row,
        so the parts are bit-identical to one call on that device. ``out_device``:
        where the parts are put (None: where each tensor is). Pure mechanism: the caller decides."""
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            dest = t.device if out_device is None else torch.device(out_device)
            if not quantised(self.shapes[name][1:]):
                out[name] = t.to(self.dtypes[name]).to(dest)
                continue
            if compute_device is None:
                parts = quantise(t, self.fmt, self.group)
            else:
                parts = self._quantise_in_chunks(t, torch.device(compute_device), dest, chunk_values)
            for part, v in parts.items():
                out[f"{name}.{part}"] = v.to(dest)
        return out

    def _quantise_in_chunks(self, t: torch.Tensor, compute: torch.device, dest: torch.device,
                            chunk_values: int) -> dict[str, torch.Tensor]:
        """:func:`quantise` of ``t [..., N]`` on ``compute``, rows of ``N`` values a chunk at a time, the
        parts gathered on ``dest``."""
        *lead, n = t.shape
        rows = t.reshape(-1, n)  # [R, N]
        specs = part_specs((rows.shape[0], n), self.fmt, self.group)
        out = {p: torch.empty(shape, dtype=dt, device=dest) for p, (shape, dt) in specs.items()}  # [R, ...]
        step = max(1, chunk_values // max(n, 1))
        for i in range(0, rows.shape[0], step):
            for p, v in quantise(rows[i:i + step].to(compute), self.fmt, self.group).items():
                out[p][i:i + step].copy_(v)
        return {p: v.reshape(*lead, v.shape[-1]) for p, v in out.items()}

    def decode(self, parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parts (with any leading dims) -> ``name -> tensor`` in the model's dtypes."""
        out: dict[str, torch.Tensor] = {}
        for name, shape in self.shapes.items():
            if not quantised(shape[1:]):
                out[name] = parts[name]
                continue
            mine = {p: parts[f"{name}.{p}"] for p in part_specs(shape, self.fmt, self.group)}
            out[name] = dequantise(mine, self.fmt, self.dtypes[name])
        return out


def layer_expert_bytes(shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype],
                       fmt: str | None) -> int:
    """Bytes of one expert of a layer with per-expert tensors ``shapes`` (``[E, ...]``) in ``fmt``
    (None: as the model holds them)."""
    if fmt is None:
        return one_expert_bytes({n: (s, dtypes[n]) for n, s in shapes.items()})
    return ExpertLayout(fmt, dict(shapes), dict(dtypes)).expert_bytes()


def one_expert_bytes(parts: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Bytes of one expert of stored tensors ``part name -> ([E, ...] shape, dtype)``."""
    return sum(torch.Size(shape[1:]).numel() * torch.empty((), dtype=dt).element_size()
               for shape, dt in parts.values())


def lowest_fitting(budget_bytes: int, totals: Mapping[str | None, int]) -> str | None:
    """The least lossy format whose whole model fits ``budget_bytes`` (``totals``: format -> bytes of
    all experts, in order from least to most lossy, None = the model's dtype); the most lossy when
    none fits (pure; the ``quantized-all`` baseline)."""
    formats = list(totals)
    return next((f for f in formats if totals[f] <= budget_bytes), formats[-1])
