"""Device slots of one MoE layer, the logical<->slot maps, and the copies that fill them.

Glossary (see also DESIGN.md)
    slot       a fixed place in the layer's device pool holding one expert's weights
    slot_of    ``[E]`` long, device: slot of each logical expert, -1 when not resident
    resident   ``[E]`` bool, device: ``slot_of >= 0`` (the mask Masked Gating uses)
    expert_in  ``[S]`` host list: the expert in each slot, -1 while empty or being written

The slot tensors are allocated once, at fixed addresses, and the maps are device tensors updated
in place, so a decode step can be captured in a CUDA graph later. The host keeps its own copy of
the maps (it decided every change), so no step ever reads them back from the device.

Only this module moves bytes; which experts to move is decided by :mod:`swapmoe.policy`.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from swapmoe.policy import Swap


class HostStore:
    """Host copies of one layer's experts: one ``[E, ...]`` tensor per weight name.

    On CUDA the tensors are pinned so that host-to-device copies run at full PCIe speed and can
    be asynchronous (pageable memory copies at a third of the speed and synchronises).
    """

    location = "host"  # where the experts wait off the device (see stats()["layers"][i]["expert_store"])

    def __init__(self, tensors: dict[str, torch.Tensor], pin: bool) -> None:
        self.tensors = {n: (t.pin_memory() if pin else t.contiguous()) for n, t in tensors.items()}
        self.pinned = pin

    @property
    def num_experts(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def expert_bytes(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.tensors.values())

    def copy_into(self, dests: dict[str, torch.Tensor], expert: int, non_blocking: bool) -> int:
        """Copy expert ``expert`` into the slot views ``dests``; returns bytes copied."""
        return copy_tensors(dests, {name: self.tensors[name][expert] for name in dests}, non_blocking)


def copy_tensors(dests: dict[str, torch.Tensor], sources: dict[str, torch.Tensor], non_blocking: bool) -> int:
    """Copy each source into its slot view; returns bytes copied."""
    n = 0
    for name, dst in dests.items():
        src = sources[name]
        dst.copy_(src, non_blocking=non_blocking)
        n += src.numel() * src.element_size()
    return n


@dataclass
class _Pending:
    """A swap in flight: its copy enqueued (``done`` set), or its expert still being read from the
    checkpoint files by the reader thread (``staged`` set, ``done`` None)."""

    slot: int
    new: int
    done: Any = None  # torch.cuda.Event recorded after the copy
    staged: Future | None = None  # the background read: name -> host tensor (pinned on CUDA)
    unmapped: Any = None  # torch.cuda.Event recorded when the slot was unmapped
    source: dict[str, torch.Tensor] | None = None  # staged tensors, alive until the copy is done


@dataclass
class SlotPool:
    """The ``S`` device slots of one MoE layer and its maps."""

    slots: dict[str, torch.Tensor]  # name -> [S, ...] on device, fixed addresses
    slot_of: torch.Tensor  # [E] long, device
    resident: torch.Tensor  # [E] bool, device
    expert_in: list[int]  # [S] host truth
    store: Any  # HostStore, or mmap_store.CheckpointStore (experts read from the safetensors files)
    pending: list[_Pending] = field(default_factory=list)

    @classmethod
    def create(
        cls, store: HostStore, initial: list[int], device: torch.device, dtypes: dict[str, torch.dtype]
    ) -> SlotPool:
        """Allocate ``len(initial)`` slots and fill them, synchronously, with ``initial`` experts."""
        num_slots = len(initial)
        slots = {
            n: torch.empty((num_slots, *t.shape[1:]), dtype=dtypes.get(n, t.dtype), device=device)
            for n, t in store.tensors.items()
        }
        slot_of = torch.full((store.num_experts,), -1, dtype=torch.long, device=device)
        resident = torch.zeros(store.num_experts, dtype=torch.bool, device=device)
        pool = cls(slots, slot_of, resident, [-1] * num_slots, store)
        for s, e in enumerate(initial):
            store.copy_into(pool.views(s), e, non_blocking=False)
            pool._map(s, e)
        return pool

    @property
    def num_slots(self) -> int:
        return len(self.expert_in)

    def views(self, slot: int) -> dict[str, torch.Tensor]:
        return {n: t[slot] for n, t in self.slots.items()}

    def slot_bytes(self) -> int:
        """Device bytes held by the slots, summed from the tensors themselves."""
        return sum(t.numel() * t.element_size() for t in self.slots.values())

    def resident_experts(self) -> list[int]:
        return sorted(e for e in self.expert_in if e >= 0)

    # The device maps change through fill_ on one-element views: a kernel with the value as argument,
    # enqueued on the current stream, where ``t[i] = v`` would copy a host scalar (a host sync on CUDA).
    def _map(self, slot: int, expert: int) -> None:
        self.slot_of[expert].fill_(slot)
        self.resident[expert].fill_(True)
        self.expert_in[slot] = expert

    def _unmap(self, slot: int) -> None:
        old = self.expert_in[slot]
        if old >= 0:
            self.slot_of[old].fill_(-1)
            self.resident[old].fill_(False)
        self.expert_in[slot] = -1


class Swapper:
    """Moves experts into slots: on a side CUDA stream (asynchronous) or synchronously.

    Asynchronous protocol for one swap ``(slot, old -> new)``:

    1. on the compute stream, unmap ``old`` (from now on no token is routed to ``slot``) and record
       an event; everything enqueued before it (which may still read ``slot``) finishes first;
    2. the copy stream waits for that event, copies ``new`` from pinned host memory into ``slot``
       and records ``done``;
    3. once ``done`` has completed (polled without blocking) the compute stream waits on it and maps
       ``new`` to ``slot``. Between 1 and 3 the slot is referenced by no map, so it is never read
       while it is being written.

    Experts of a checkpoint-backed layer (``--host-budget``) are first read from the safetensors files
    by a reader thread (into pinned memory on CUDA), off the critical path: between 1 and 2 the swap
    waits, unmapped, for its read; :meth:`poll` enqueues the copy once the read has finished.
    ``background_reads`` (default: with asynchronous copies) turns the reader on or off.
    """

    def __init__(self, device: torch.device, asynchronous: bool, background_reads: bool | None = None) -> None:
        self.device = device
        self.asynchronous = asynchronous and device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.asynchronous else None
        reads = self.asynchronous if background_reads is None else background_reads
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swapmoe-read") if reads else None

    def submit(self, pool: SlotPool, swaps: list[Swap]) -> int:
        """Start the swaps; returns bytes scheduled for copying."""
        copied = 0
        for sw in swaps:
            pool._unmap(sw.slot)
            if self.reader is not None and pool.store.location == "checkpoint":
                staged = self.reader.submit(pool.store.stage, sw.new, self.stream is not None)
                pool.pending.append(_Pending(sw.slot, sw.new, staged=staged, unmapped=self._mark_unmapped()))
                copied += pool.store.expert_bytes()
                continue
            if self.stream is None:
                copied += pool.store.copy_into(pool.views(sw.slot), sw.new, non_blocking=False)
                pool._map(sw.slot, sw.new)
                continue
            pending = _Pending(sw.slot, sw.new, unmapped=self._mark_unmapped())
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(pending.unmapped)
                copied += pool.store.copy_into(pool.views(sw.slot), sw.new, non_blocking=True)
                pending.done = self._mark_copied()
            pool.pending.append(pending)
        return copied

    def _mark_unmapped(self) -> Any:
        """An event after the unmap on the compute stream (None on CPU, where work is in order)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _mark_copied(self) -> torch.cuda.Event:
        assert self.stream is not None
        done = torch.cuda.Event()
        done.record(self.stream)
        return done

    def _copy_staged(self, pool: SlotPool, p: _Pending) -> bool:
        """The read of ``p`` has finished: copy it into its slot. True when the slot can be mapped now
        (CPU: the copy is done); on CUDA the copy is enqueued on the side stream and mapped later."""
        assert p.staged is not None
        source = p.staged.result()  # re-raises a failed read here, on the thread that swaps
        if self.stream is None:
            copy_tensors(pool.views(p.slot), source, non_blocking=False)
            return True
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(p.unmapped)
            copy_tensors(pool.views(p.slot), source, non_blocking=True)
            p.done = self._mark_copied()
        p.source = source  # the pinned tensors must outlive the asynchronous copy
        return False

    def poll(self, pool: SlotPool, wait: bool = False) -> int:
        """Map the experts whose copies have finished (all of them if ``wait``); returns how many."""
        if not pool.pending:
            return 0
        still: list[_Pending] = []
        finished = 0
        for p in pool.pending:
            if p.done is None:  # still being read from the checkpoint files
                if not (wait or p.staged.done()):
                    still.append(p)
                    continue
                if self._copy_staged(pool, p):
                    pool._map(p.slot, p.new)
                    finished += 1
                    continue
            if wait or p.done.query():
                torch.cuda.current_stream(self.device).wait_event(p.done)
                pool._map(p.slot, p.new)
                finished += 1
            else:
                still.append(p)
        pool.pending = still
        return finished
