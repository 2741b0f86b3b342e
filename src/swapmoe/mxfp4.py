"""Experts of checkpoints published in MXFP4 (gpt-oss), held as the checkpoint stores them.

The published gpt-oss checkpoints (``quantization_config.quant_method == "mxfp4"``) store each fused
expert matrix as two tensors, in the orientation ``[E, out, in]`` (the transpose of the module's
``gate_up_proj [E, H, 2I]`` / ``down_proj [E, I, H]``):

    ``{name}_blocks``  ``[E, out, in/32, 16]`` uint8: FP4 (OCP e2m1) codes, two per byte, low nibble
                       first (value ``2j`` in bits 0-3, ``2j+1`` in bits 4-7)
    ``{name}_scales``  ``[E, out, in/32]`` uint8: one e8m0 scale per 32 values, ``2 ** (s - 127)``

An e2m1 code is ``sign | exponent (2 bits) | mantissa (1 bit)``: magnitudes
``0, 0.5, 1, 1.5, 2, 3, 4, 6``. Decoding is exact in float32 and bfloat16 (two significant bits times a
power of two in ``[2**-127, 2**127]``), so the weights decoded here are bit for bit those transformers
builds with ``Mxfp4Config(dequantize=True)`` (``convert_moe_packed_tensors``).

swapmoe holds these parts as they are, ``4.25`` bits per weight: the ``mxfp4`` format of a layer
(:class:`Mxfp4Layout`) has parts ``gate_up_proj.blocks``, ``gate_up_proj.scales``, ``down_proj.blocks``,
``down_proj.scales`` and the biases as the model holds them; the host store and the checkpoint-backed
store read them from the files (one expert at a time with ``get_slice``), the slots hold them, and
:mod:`swapmoe.qexperts` decodes only the experts the tokens chose (:meth:`Mxfp4Layout.decode`: tensor
ops only, no host sync, so it runs inside a captured CUDA graph). transformers is asked for its decoded
model (the plain experts module); while it loads, each decoded matrix is checked against the files
(:class:`Mxfp4Finder`) and dropped, keeping only the experts' norms (swapmoe.streaming).

    E = experts (or S slots, or C gathered experts), R = rows (out), N = in, G = N/32 groups
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from swapmoe.errors import CheckpointError
from swapmoe.families import MoELayer
from swapmoe.mmap_store import CheckpointStore, SafetensorsFiles
from swapmoe.quant import ExpertLayout, StoredLayout

FORMAT = "mxfp4"
#: values per e8m0 scale (OCP MX block size; gpt-oss)
BLOCK = 32
_BYTES_PER_BLOCK = BLOCK // 2
_E8M0_BIAS = 127
_E8M0_NAN = 255
#: e2m1 magnitudes by 3-bit code (sign is bit 3)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: the fused expert matrices gpt-oss stores in MXFP4 (their biases stay in the checkpoint's dtype)
QUANTISED = ("gate_up_proj", "down_proj")


def checkpoint_is_mxfp4(config: Mapping[str, object]) -> bool:
    """Does a checkpoint's ``config.json`` (as a dict) say its experts are stored in MXFP4?"""
    q = config.get("quantization_config")
    return isinstance(q, Mapping) and str(q.get("quant_method", "")).lower() == FORMAT


# ----------------------------------------------------------------------------------------- the codec
def _e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (any integer dtype, values 0..15) -> their e2m1 values, float32, by arithmetic
    (no lookup table: a table would be a host-to-device copy, which a CUDA graph cannot hold)."""
    c = codes.to(torch.int32)
    exp = (c >> 1) & 3  # 0 (subnormal), 1, 2, 3
    man = (c & 1).float()
    normal = (1.0 + 0.5 * man) * (1 << (exp - 1).clamp(min=0)).float()  # 2**(e-1) * (1 + m/2)
    mag = torch.where(exp == 0, 0.5 * man, normal)
    return torch.where((c & 8) != 0, -mag, mag)


def _e8m0_values(scales: torch.Tensor) -> torch.Tensor:
    """e8m0 bytes -> ``2 ** (s - 127)`` float32, exactly: the bits of the float built directly
    (``s << 23``; ``s = 0`` is the subnormal ``2**-127``, bits ``1 << 22``)."""
    s = scales.to(torch.int32)
    bits = torch.where(s == 0, torch.full_like(s, 1 << 22), s << 23)
    return bits.view(torch.float32)


def _byte_values(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[256, 2]``: the two e2m1 values of every byte (low nibble first), built on ``device`` from an
    ``arange`` (a kernel, not a host-to-device copy, so it is made inside a CUDA graph too)."""
    b = torch.arange(256, device=device)
    return torch.stack((_e2m1_values(b & 15), _e2m1_values(b >> 4)), dim=-1).to(dtype)


def decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``blocks [..., G, 16]`` uint8 and ``scales [..., G]`` uint8 -> the values ``[..., G*32]`` in
    ``dtype``, exactly (see the module docstring). Tensor ops only: one gather of each byte's two values
    and one multiply by the scale, both in ``dtype`` where it holds every product exactly (bfloat16,
    float32: far less memory traffic than building float32 values first), else in float32, then cast."""
    work = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32
    x = _byte_values(blocks.device, work)[blocks.int()]  # [..., G, 16, 2]
    x = x.flatten(-2) * _e8m0_values(scales).to(work).unsqueeze(-1)  # [..., G, 32]
    return x.flatten(-2).to(dtype)


def encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values ``w [..., N]`` (``N`` a multiple of 32) -> ``(blocks [..., N/32, 16], scales [..., N/32])``.

    Per block of 32: the smallest power-of-two scale with ``amax / scale <= 6`` (no value clips), then
    each value rounded to the nearest e2m1 magnitude. Values already on the MXFP4 grid of a block
    come back exactly. Used to write MXFP4 checkpoints (tests, benchmarks/mxfp4.py); loading never re-encodes.
    """
    n = w.shape[-1]
    if n % BLOCK:
        raise ValueError(f"MXFP4 needs a last dim that is a multiple of {BLOCK}, got {n}")
    x = w.float().reshape(*w.shape[:-1], n // BLOCK, BLOCK)  # [..., G, 32]
    amax = x.abs().amax(-1)  # [..., G]
    # smallest e with amax <= 6 * 2**e; all-zero blocks get the smallest scale
    e = torch.ceil(torch.log2(amax / E2M1[-1])).nan_to_num(neginf=-_E8M0_BIAS)
    e = e.clamp(-_E8M0_BIAS, _E8M0_BIAS)
    scales = (e + _E8M0_BIAS).to(torch.uint8)
    y = (x / _e8m0_values(scales).unsqueeze(-1)).abs().clamp(max=E2M1[-1]).contiguous()  # [..., G, 32] in [0, 6]
    grid = torch.tensor(E2M1, device=x.device)
    mids = (grid[1:] + grid[:-1]) / 2  # [7]: a value above mids[i] rounds to code i+1
    code = torch.bucketize(y, mids, right=False).to(torch.uint8)  # ties round to the lower magnitude
    code = code | ((x < 0) & (code > 0)).to(torch.uint8) << 3
    code = code.reshape(*x.shape[:-1], _BYTES_PER_BLOCK, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)
    return blocks, scales


# ------------------------------------------------------------------------------------- the format
@dataclass(frozen=True)
class Mxfp4Layout(StoredLayout):
    """How one MoE layer's experts are stored in the ``mxfp4`` format: the checkpoint's own parts.

    A :class:`swapmoe.quant.StoredLayout`, as :class:`swapmoe.quant.ExpertLayout` is (what the stores,
    the slots and :mod:`swapmoe.qexperts` use): ``shapes``/``dtypes`` are the module's per-expert tensors
    (``[E, ...]`` and the dtype it computes in); ``gate_up_proj``/``down_proj`` are stored as
    ``name.blocks`` ``[E, out, in/32, 16]`` and ``name.scales`` ``[E, out, in/32]`` (the module holds
    ``[E, in, out]``), any other tensor (the biases) as it is.
    """

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    fmt: str = FORMAT

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> Mxfp4Layout:
        return cls(*cls.shapes_and_dtypes(tensors))

    def parts(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every stored tensor: ``part name -> ([E, ...] shape, dtype)``."""
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for name, shape in self.shapes.items():
            if name not in QUANTISED:
                out[name] = (shape, self.dtypes[name])
                continue
            e, n_in, n_out = shape
            if n_in % BLOCK:
                raise CheckpointError(f"{name} has an input dim of {n_in}, not a multiple of {BLOCK}: it cannot "
                                      "be MXFP4; load with --expert-dtype bf16")
            out[f"{name}.blocks"] = ((e, n_out, n_in // BLOCK, _BYTES_PER_BLOCK), torch.uint8)
            out[f"{name}.scales"] = ((e, n_out, n_in // BLOCK), torch.uint8)
        return out

    def decode(self, parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parts (with any leading dims) -> ``name -> tensor`` as the module holds it ([..., in, out])."""
        return {name: self.decode_matrix(parts, name) if name in QUANTISED else parts[name] for name in self.shapes}

    def decode_matrix(self, parts: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        """One MXFP4 matrix ``name`` from its parts -> ``[..., in, out]`` in the module's dtype."""
        return decode_expert(parts[f"{name}.blocks"], parts[f"{name}.scales"], self.dtypes[name])

    def encode(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``name -> [..., *expert shape]`` tensors as the module holds them -> their parts (lossy
        where a value is off the MXFP4 grid; exact for weights decoded from MXFP4)."""
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if name not in QUANTISED:
                out[name] = t.to(self.dtypes[name])
                continue
            out[f"{name}.blocks"], out[f"{name}.scales"] = encode(t.transpose(-1, -2))
        return out


# ------------------------------------------------------------------------ the checkpoint's tensors
def part_keys(experts_module_name: str) -> dict[str, str]:
    """Checkpoint tensor name of each MXFP4 part of the experts module at ``experts_module_name``
    (``model.layers.0.mlp.experts``): ``gate_up_proj.blocks -> ...experts.gate_up_proj_blocks``."""
    return {f"{name}.{p}": f"{experts_module_name}.{name}_{p}" for name in QUANTISED for p in ("blocks", "scales")}


def find_parts(model: nn.Module, layers: Sequence[MoELayer], files: SafetensorsFiles) -> dict[str, dict[str, str]]:
    """The MXFP4 parts of each MoE layer stored in MXFP4 (block name -> part -> checkpoint key), each
    checked against the shapes ``model`` (the skeleton, or the loaded model) needs; a layer stored
    unquantised (``modules_to_not_convert``) is left out. Raises a one-line :class:`CheckpointError`
    for a part that is missing, of the wrong shape or not uint8: transformers would otherwise load it
    into weights of the wrong values, or fail deep inside."""
    names = {id(m): n for n, m in model.named_modules()}
    found: dict[str, dict[str, str]] = {}
    for la in layers:
        keys = part_keys(names[id(la.experts)])
        present = [k for k in keys.values() if k in files.where]
        if not present:
            continue
        layout = Mxfp4Layout.of({n: getattr(la.experts, n) for n in la.expert_param_names})
        specs = layout.parts()
        for part, key in keys.items():
            if key not in files.where:
                raise CheckpointError(f"{la.name}: the MXFP4 checkpoint has {present[0]} but no {key}; copy or "
                                      "download the complete checkpoint")
            want = specs[part][0]
            got = files.shape(key)
            if got != want:
                raise CheckpointError(f"{la.name}: {key} is {list(got)}, the config needs {list(want)} (MXFP4: FP4 "
                                      f"codes two per byte, one scale per {BLOCK} values); the checkpoint does not "
                                      "match its config.json")
            dtype = files.dtype(key)
            if dtype != "U8":
                raise CheckpointError(f"{la.name}: {key} is {dtype}, MXFP4 blocks and scales are uint8 (U8); the "
                                      "checkpoint is corrupt or not MXFP4")
        found[la.name] = keys
    return found


def check_scales(keys: Mapping[str, str], files: SafetensorsFiles) -> None:
    """Raise a one-line :class:`CheckpointError` where a layer's scales hold the e8m0 NaN byte (255),
    which would decode to NaN weights. Reads every scale once (1/16 of the blocks' bytes)."""
    for part, key in keys.items():
        if part.endswith(".scales") and bool((files.tensor(key) == _E8M0_NAN).any()):
            raise CheckpointError(f"{key} holds the e8m0 NaN scale (255): the checkpoint is corrupt; copy or "
                                  "download it again")


def decode_expert(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One stored matrix (``[..., out, in/32, 16]`` and ``[..., out, in/32]``) -> ``[..., in, out]`` as
    the module holds it."""
    return decode(blocks, scales, dtype).transpose(-1, -2).contiguous()


class Mxfp4Finder:
    """The MXFP4 "recipe" of one layer's ``gate_up_proj``/``down_proj``: its blocks and scales keys,
    verified as :class:`swapmoe.mmap_store.RecipeFinder` verifies a recipe (first and last expert,
    value for value, against what transformers loaded). The loading streamer
    (:class:`swapmoe.streaming.ExpertStreamer`) uses it in place of a RecipeFinder for a layer stored in
    MXFP4, so that transformers' decoded copy of the layer is dropped as soon as it is checked."""

    def __init__(self, keys: Mapping[str, str], files: SafetensorsFiles) -> None:
        self.keys = dict(keys)
        self.files = files
        self.prefix = self.keys[f"{QUANTISED[0]}.blocks"].rsplit(".", 1)[0]  # the experts module's name

    def recipe(self, name: str, target: torch.Tensor) -> list[str] | None:
        """``[blocks key, scales key]`` of an MXFP4 matrix, ``[key]`` of a bias stored as it is, or None
        where the checkpoint's tensors do not give ``target [E, ...]`` exactly."""
        if name in QUANTISED:
            recipe = [self.keys[f"{name}.blocks"], self.keys[f"{name}.scales"]]
        elif f"{self.prefix}.{name}" in self.files.where:
            recipe = [f"{self.prefix}.{name}"]
        else:
            return None
        for e in (0, target.shape[0] - 1):
            got = self._read(recipe, e, target.dtype)
            if got.shape != target[e].shape or not torch.equal(got, target[e]):
                return None
        return recipe

    def _read(self, recipe: list[str], e: int, dtype: torch.dtype) -> torch.Tensor:
        if len(recipe) == 1:
            return self.files.read_expert(recipe, e).to(dtype)
        return decode_expert(*(self.files.read_expert([k], e) for k in recipe), dtype)

    def store(self, recipes: dict[str, list[str]], shapes: dict[str, torch.Size], dtypes: dict[str, torch.dtype],
              held: dict[str, torch.Tensor] | None = None) -> DecodingStore:
        """The experts left in the files and decoded as they are read (``--expert-dtype bf16|int8|int4``
        beyond the host budget: converted from MXFP4 one expert per swap)."""
        return DecodingStore(recipes, self.files, shapes, dtypes, held)


class DecodingStore(CheckpointStore):
    """A :class:`CheckpointStore` whose MXFP4 parameters (recipe ``[blocks key, scales key]``) are decoded
    as each expert is read; with a layout (int8/int4) the decoded expert is then quantised."""

    def expert(self, name: str, e: int) -> torch.Tensor:
        if name in self.held:
            return self.held[name][e]
        recipe = self.recipes[name]
        if len(recipe) == 1:  # a bias, stored as it is
            return self.files.read_expert(recipe, e).to(self.dtypes[name])
        blocks, scales = (self.files.read_expert([k], e) for k in recipe)
        return decode_expert(blocks, scales, self.dtypes[name])

    def with_layout(self, layout: ExpertLayout, compute: torch.device | None = None) -> DecodingStore:
        return DecodingStore(self.recipes, self.files, self.shapes, self.dtypes, self.held, layout, compute)


def _verify(layer: str, parts_of: Callable[[int], dict[str, torch.Tensor]], dense: Mapping[str, torch.Tensor],
            dtypes: Mapping[str, torch.dtype], num_experts: int) -> None:
    """The first and the last expert's parts must decode to exactly what transformers loaded from the
    same files (``dense``: ``name -> [E, ...]``, for the matrices not verified while streaming);
    otherwise the parts are not what they seem."""
    for e in (0, num_experts - 1):
        parts = parts_of(e)
        for name in (n for n in QUANTISED if n in dense):
            if not torch.equal(decode_expert(parts[f"{name}.blocks"], parts[f"{name}.scales"], dtypes[name]),
                               dense[name][e]):
                raise CheckpointError(f"{layer}: expert {e}'s MXFP4 {name} does not decode to the weights "
                                      "transformers loads from the same files; load with --expert-dtype bf16")


def host_parts(layer: str, layout: Mxfp4Layout, keys: Mapping[str, str], files: SafetensorsFiles,
               held: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All experts of one layer as the ``mxfp4`` format holds them (``part -> [E, ...]``): blocks and
    scales read from the files; the biases from ``held`` (the loaded module's tensors, with any matrix
    not already verified while streaming, which is verified here)."""
    parts = {part: files.tensor(key) for part, key in keys.items()}
    _verify(layer, lambda e: {p: t[e] for p, t in parts.items()}, held, layout.dtypes, layout.num_experts)
    parts.update({n: t for n, t in held.items() if n not in QUANTISED})
    return parts


def checkpoint_store(layer: str, layout: Mxfp4Layout, keys: Mapping[str, str], files: SafetensorsFiles,
                     held: Mapping[str, torch.Tensor]) -> CheckpointStore:
    """One layer's experts left in the files (``--host-budget``): each swap reads one expert's blocks and
    scales (``get_slice(key)[e]``), as they are; the biases (a sliver) are held in memory."""
    _verify(layer, lambda e: {p: files.read_expert([k], e) for p, k in keys.items()}, held, layout.dtypes,
            layout.num_experts)
    specs = layout.parts()
    return CheckpointStore({p: [k] for p, k in keys.items()}, files,
                           {p: torch.Size(s) for p, (s, _) in specs.items()}, {p: dt for p, (_, dt) in specs.items()},
                           {n: t for n, t in held.items() if n not in QUANTISED})


# --------------------------------------------------------------------------------- writing a checkpoint
#: what openai/gpt-oss-20b's config.json lists (its router, attention, embeddings and head are bf16)
QUANTIZATION_CONFIG = {
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
    "quant_method": FORMAT,
}


def mxfp4_state_dict(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A gpt-oss model's state dict as the published checkpoints store it: each experts module's
    ``gate_up_proj``/``down_proj`` as ``*_blocks``/``*_scales`` (:func:`encode` of the ``[E, out, in]``
    transpose), every other tensor in ``dtype``; on the host."""
    state: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if ".experts." in name and name.rsplit(".", 1)[-1] in QUANTISED:
            blocks, scales = encode(t.detach().transpose(-1, -2))  # [E, out, in/32, 16], [E, out, in/32]
            state[f"{name}_blocks"], state[f"{name}_scales"] = blocks.contiguous().cpu(), scales.contiguous().cpu()
        else:
            state[name] = t.detach().to(dtype).contiguous().cpu()
    return state


def save_mxfp4(model: nn.Module, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Save a gpt-oss ``model`` at ``path`` in the published MXFP4 layout (config.json with
    ``quantization_config``, one ``model.safetensors``); ``state``: the tensors to write instead of
    :func:`mxfp4_state_dict` (a test's corrupted copy). Experts' input dims must be multiples of 32."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = mxfp4_state_dict(model) if state is None else state
    model.config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = QUANTIZATION_CONFIG
    cfg["dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path

