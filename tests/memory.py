"""Measure the memory a virtualised model holds, from the tensors' storages rather than declared sizes.

``stats()["resident_bytes"]`` is computed from the slot tensors the pool allocated, so a test that
compares it with the budget compares an allocation with itself. Here the bytes are found the other way
round: walk every object the experts modules and the runtime reach, collect every tensor, and count
each distinct *storage* once at its full size (a view of a larger buffer counts the whole buffer).
A swap that allocated a fresh slot tensor while the old one stayed referenced, or a runtime that kept
an extra copy of an expert, shows up in that sum.

The experts' off-device store (host memory or the memory-mapped checkpoint, recognised by its
``location`` of "host" or "checkpoint") is outside the device budget by design and is not walked.
Modules reached through the runtime (the router, the MoE block) are not walked either: their weights
are the model's non-expert weights; the experts modules are walked on their own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

OFF_DEVICE_STORES = ("host", "checkpoint")


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


class StorageWalk:
    """Distinct storages reachable from some roots: ``bytes`` is their total size."""

    def __init__(self) -> None:
        self.storages: dict[tuple[str, int], int] = {}
        self._seen: set[int] = set()

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def add_tensor(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        self.storages[_storage_key(t)] = t.untyped_storage().nbytes()

    def add_module_tensors(self, module: nn.Module) -> None:
        """A module's own parameters, buffers and tensor attributes (not its children's)."""
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if t is not None:
                self.add_tensor(t)
        for v in vars(module).values():
            self.walk(v, into_modules=False)

    def walk(self, obj: Any, into_modules: bool = False) -> None:
        if id(obj) in self._seen or obj is None or isinstance(obj, (str, bytes, int, float, bool, type)):
            return
        self._seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            self.add_tensor(obj)
        elif isinstance(obj, nn.Module):
            if into_modules:
                self.add_module_tensors(obj)
        elif getattr(type(obj), "location", None) in OFF_DEVICE_STORES:
            return  # the off-device store: outside the budget by design
        elif isinstance(obj, dict):
            for v in obj.values():
                self.walk(v)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for v in obj:
                self.walk(v)
        elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
            for v in vars(obj).values() if hasattr(obj, "__dict__") else ():
                self.walk(v)
            for name in getattr(type(obj), "__slots__", ()):
                self.walk(getattr(obj, name, None))


def experts_storages(model: nn.Module) -> StorageWalk:
    """Storages the virtualised experts modules compute from (parameters, buffers, tensor attributes)."""
    walk = StorageWalk()
    for st in model.swapmoe.layers:
        walk.walk(st.layer.experts, into_modules=True)
    return walk


def held_storages(model: nn.Module) -> StorageWalk:
    """Storages held by the experts modules and by everything the runtime reaches (stores excluded)."""
    walk = experts_storages(model)
    walk.walk(model.swapmoe)
    return walk


def bookkeeping_allowance(model: nn.Module) -> int:
    """Bytes the runtime may hold beside expert weights: maps, importance, norms and counters, a few
    small ``[E]`` tensors per layer. 64 bytes per logical expert (eight ``[E]`` float64/long tensors)
    plus 4 KiB per layer is far below one expert of any model (the tiny test models' experts are
    18 KiB), so an extra expert copy cannot hide in it."""
    return sum(64 * st.layer.num_experts + 4096 for st in model.swapmoe.layers)


def slot_addresses(model: nn.Module) -> list[tuple[str, int]]:
    """The storage of each expert weight the experts modules compute from, in a fixed order."""
    return [_storage_key(getattr(st.layer.experts, n)) for st in model.swapmoe.layers
            for n in st.layer.expert_param_names]


def distinct_bytes(tensors: Iterable[torch.Tensor]) -> int:
    walk = StorageWalk()
    for t in tensors:
        walk.add_tensor(t)
    return walk.bytes
