"""Experts that stay in the checkpoint's safetensors files, read one expert at a time.

When a host budget is set, the experts of the layers that do not fit in it are not kept in host
memory: a swap reads the one expert it needs straight from the memory-mapped safetensors file
(``safe_open(...).get_slice(key)[e]`` touches only that expert's bytes).

Which checkpoint tensors make up a fused parameter is *discovered and verified*, not assumed per
family: as transformers hands each fused ``[E, ...]`` parameter to the model (swapmoe.streaming),
or right after loading, the parameter is matched either to a fused key of the same layer, or to one
or two per-expert keys (``...experts.{e}.gate_proj.weight`` and ``...up_proj.weight``, concatenated
along the first dimension, as transformers' conversion does), and the match is checked value for
value on the first and the last expert. A parameter without a verified match stays in host memory
(and the loader says so), so a wrong mapping can never produce wrong weights.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import permutations
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from swapmoe.pool import copy_tensors
from swapmoe.quant import ExpertLayout

# one recipe per fused parameter: key templates whose tensors are concatenated along dim 0; a key
# without "{e}" is a fused [E, ...] tensor indexed by expert
Recipe = list[str]


class SafetensorsFiles:
    """A checkpoint's safetensors files by tensor name, each opened once (its header parsed once) and
    kept open for every later read; shared by the recipe search and the store it builds."""

    def __init__(self, where: dict[str, Path]) -> None:
        self.where = where  # tensor name -> file (sharded checkpoints spread a layer over files)
        self._open: dict[Path, Any] = {}

    def _file(self, key: str) -> Any:
        path = self.where[key]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """The safetensors dtype name of ``key`` ("BF16", "U8", ...), from the header."""
        return str(self._file(key).get_slice(key).get_dtype())

    def tensor(self, key: str) -> torch.Tensor:
        """The whole tensor ``key`` (host memory)."""
        return self._file(key).get_tensor(key)

    def read_expert(self, recipe: Recipe, e: int) -> torch.Tensor | None:
        """Expert ``e`` as ``recipe`` assembles it (``[...]``, host memory); None when one of its
        per-expert tensors is not in the checkpoint."""
        parts = []
        for key in recipe:
            if "{e}" in key:
                k = key.format(e=e)
                if k not in self.where:
                    return None
                parts.append(self._file(k).get_tensor(k))
            else:
                parts.append(self._file(key).get_slice(key)[e])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


class CheckpointStore:
    """One layer's experts, read from safetensors on demand (same interface as ``HostStore``).

    With a ``layout`` (``--expert-dtype int8|int4|int3|int2``) every expert is quantised as it is read, so the
    slots receive its parts (:class:`swapmoe.quant.ExpertLayout`) and parameters held in memory are
    held quantised.
    """

    pinned = False
    location = "checkpoint"

    def __init__(self, recipes: dict[str, Recipe], files: SafetensorsFiles, shapes: dict[str, torch.Size],
                 dtypes: dict[str, torch.dtype], held: dict[str, torch.Tensor] | None = None,
                 layout: ExpertLayout | None = None, compute: torch.device | None = None):
        self.recipes = recipes
        # parameters whose checkpoint tensors could not be verified stay in memory ([E, ...])
        self.held = dict(held or {})
        self.files = files  # open files, reused by every swap
        self.shapes = shapes  # name -> [E, ...]
        self.dtypes = dtypes
        self.layout = layout
        # quantised: the held parameters as parts ([E, ...], host memory), quantised once here, on
        # ``compute`` (the GPU at load; None: the host)
        self.held_parts = layout.encode(self.held, compute_device=compute) if layout is not None else {}
        if layout is not None:
            self.held = {}

    def with_layout(self, layout: ExpertLayout, compute: torch.device | None = None) -> CheckpointStore:
        """The same experts, quantised as they are read (and held parameters quantised now, on
        ``compute``: None for the host)."""
        return CheckpointStore(self.recipes, self.files, self.shapes, self.dtypes, self.held, layout, compute)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Shape and dtype stand-ins (meta tensors): nothing of the experts is held in memory."""
        if self.layout is not None:
            return {n: torch.empty(s, dtype=dt, device="meta") for n, (s, dt) in self.layout.parts().items()}
        return {n: torch.empty(s, dtype=self.dtypes[n], device="meta") for n, s in self.shapes.items()}

    @property
    def num_experts(self) -> int:
        return next(iter(self.shapes.values()))[0]

    def expert_bytes(self) -> int:
        if self.layout is not None:
            return self.layout.expert_bytes()
        return sum(torch.Size(s[1:]).numel() * torch.empty((), dtype=self.dtypes[n]).element_size()
                   for n, s in self.shapes.items())

    def expert(self, name: str, e: int) -> torch.Tensor:
        """Expert ``e`` of parameter ``name``, read from the files (``[...]``, host memory)."""
        if name in self.held:
            return self.held[name][e]
        t = self.files.read_expert(self.recipes[name], e)
        assert t is not None, "a recipe is verified before a store is built from it"
        return t.to(self.dtypes[name])

    def _read(self, expert: int) -> dict[str, torch.Tensor]:
        """Expert ``expert`` as the slots hold it: its tensors, or (with a layout) their parts."""
        if self.layout is None:
            return {name: self.expert(name, expert) for name in self.shapes}
        # on the host, not the GPU: this runs in the swapper's reader thread during decode, where a
        # quantisation kernel would contend with the decode stream (and its graph replays) for the GPU
        parts = self.layout.encode({name: self.expert(name, expert) for name in self.recipes})
        parts.update({n: t[expert] for n, t in self.held_parts.items()})
        return parts

    def copy_into(self, dests: dict[str, torch.Tensor], expert: int, non_blocking: bool) -> int:
        # from pageable memory: a synchronous copy whatever ``non_blocking`` says (see stage())
        if self.layout is None:
            return copy_tensors(dests, {name: self.expert(name, expert) for name in dests}, non_blocking=False)
        return copy_tensors(dests, self._read(expert), non_blocking=False)

    def stage(self, expert: int, pin: bool) -> dict[str, torch.Tensor]:
        """Expert ``expert`` read from the files into host memory (quantised, with a layout), pinned if
        ``pin`` (so that its copy to the device can be asynchronous); the swapper's reader thread calls
        this off the critical path."""
        parts = self._read(expert)
        return {n: t.pin_memory() for n, t in parts.items()} if pin else parts


def weight_files(files: Sequence[Path]) -> dict[str, Path]:
    """Every tensor name of a checkpoint and the file that holds it."""
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                where[k] = f
    return where


def _layer_key(module_name: str) -> str | None:
    """The part of a MoE block's module path that its checkpoint keys contain: ``layers.3.``, or
    ``encoder.block.1.`` / ``decoder.block.1.`` for encoder-decoders (Switch Transformers)."""
    m = re.search(r"((?:encoder\.|decoder\.)?(?:layers|block)\.\d+\.)", module_name + ".")
    return m.group(1) if m else None


class RecipeFinder:
    """Finds and verifies the recipe of each fused parameter of one MoE layer.

    Only the first and the last expert are read to verify a candidate (``get_slice(key)[e]`` for a
    fused ``[E, ...]`` key), so matching costs two experts' bytes per candidate, not the layer's.
    The open files are kept and handed to the store built from the recipes.
    """

    def __init__(self, layer_name: str, where: dict[str, Path]) -> None:
        part = _layer_key(layer_name)
        self.files = SafetensorsFiles(where)
        self.mine = [k for k in where if part is not None and part in k]
        # per-expert names: "experts.0.gate_proj.weight", or Switch's "experts.expert_0.wi.weight"
        first = re.compile(r"experts\.(expert_)?0\.")
        self.per_expert = sorted({first.sub(lambda m: f"experts.{m.group(1) or ''}{{e}}.", k)
                                  for k in self.mine if first.search(k)})

    def _matches(self, recipe: Recipe, target: torch.Tensor) -> bool:
        for e in (0, target.shape[0] - 1):
            got = self.files.read_expert(recipe, e)
            if got is None or got.shape != target[e].shape or not torch.equal(got.to(target.dtype), target[e]):
                return False
        return True

    def recipe(self, name: str, target: torch.Tensor) -> Recipe | None:
        """The verified recipe of fused parameter ``name`` whose loaded value is ``target [E, ...]``."""
        # fused [E, ...] tensors of this layer with the right shape, under any name (GraniteMoE's
        # checkpoints call gate_up_proj "input_linear"); the value check decides
        fused = [k for k in self.mine if self.files.shape(k) == tuple(target.shape)]
        fused.sort(key=lambda k: not k.endswith(f".{name}"))
        for k in fused:
            if self._matches([k], target):
                return [k]
        shape = target.shape[1:]
        first_shapes = {t: self.files.shape(t.format(e=0)) for t in self.per_expert
                        if t.format(e=0) in self.files.where}
        singles = [t for t, sh in first_shapes.items() if sh == tuple(shape)]
        halves = [t for t, sh in first_shapes.items() if sh[1:] == tuple(shape[1:]) and sh[0] * 2 == shape[0]]
        for cand in [[t] for t in singles] + [list(p) for p in permutations(halves, 2)]:
            if self._matches(cand, target):
                return cand
        return None

    def store(self, recipes: dict[str, Recipe], shapes: dict[str, torch.Size], dtypes: dict[str, torch.dtype],
              held: dict[str, torch.Tensor] | None = None) -> CheckpointStore:
        return CheckpointStore(recipes, self.files, shapes, dtypes, held)


def discover(layer_name: str, host: dict[str, torch.Tensor], where: dict[str, Path]) -> CheckpointStore | None:
    """Verified recipes for the fused tensors ``host`` (``name -> [E, ...]``) of the layer at
    ``layer_name``, or None when any of them cannot be matched exactly."""
    if _layer_key(layer_name) is None:
        return None
    finder = RecipeFinder(layer_name, where)
    recipes: dict[str, Recipe] = {}
    for name, target in host.items():
        found = finder.recipe(name, target)
        if found is None:
            return None
        recipes[name] = found
    return finder.store(recipes, {n: t.shape for n, t in host.items()}, {n: t.dtype for n, t in host.items()})
