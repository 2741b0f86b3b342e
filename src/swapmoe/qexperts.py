"""Computing an experts module whose weights are held quantised, without dequantising them all.

The slots of a quantised layer hold parts (:class:`swapmoe.quant.ExpertLayout`: ``gate_up_proj.q``,
``gate_up_proj.scale``, ...), not the module's parameters. :class:`QuantisedForward` becomes the
module's ``forward``; for each call it

1. gathers the parts of only the slots the call's tokens chose and dequantises them into a scratch
   ``[C, ...]`` tensor per parameter (a temporary of the call, in the model's dtype);
2. hands transformers' own experts kernel (grouped_mm, batched_mm or eager, whatever the config
   says) the scratch as the module's parameters, with the slot ids renumbered into it and
   ``num_experts = C``; ids of a skipped term (``>= S``) become ``C``, which the kernels skip;
3. puts the empty placeholders back.

Two ways to choose ``C``:

* **per term** (``T*K <= S``, every decode step): scratch entry ``j`` is the ``j``-th (token, choice)
  term, ``C = T*K``. Shapes depend on ``T`` and ``K`` only and nothing is read back to the host, so
  the same code runs inside a captured CUDA graph (its temporaries come from the graph's pool). A
  skipped term's entry is zeroed: its slot may be the target of a copy in flight.
* **per used slot** (``T*K > S``, a prefill): the distinct slots the call chose (``U <= S``), found
  with ``nonzero`` (a host sync; prefills run eagerly), taken in chunks of at most
  :func:`slots_per_chunk` slots so that dequantising stays under :data:`CHUNK_BYTES` whatever ``U``
  is. When all ``U`` fit in one chunk the call is the plain one (``C = U``). Otherwise the kernel runs
  once per chunk (``C`` = that chunk's slots) on the call's terms laid out one per row (``[T*K, 1]``
  ids, each token's hidden state repeated ``K`` times, weight 1), a term routed outside the chunk
  getting the skip id; each row's result is that one term's expert output, kept from the chunk that
  computed it; the rows are then weighted and summed per token exactly as transformers' grouped_mm
  and batched_mm kernels do (``[T, K, H].sum(1)``, float32 accumulation). See :meth:`QuantisedForward.chunked`
  for what this does and does not keep bit for bit.

So no more than ``min(T*K, S)`` experts of one layer exist in high precision at a time (per term), or
one chunk's worth (per used slot), and only for the duration of that layer's call.

    T = tokens, K = experts per token, S = slots (all E experts for a full layer), U = used slots,
    C = scratch entries, H = hidden size
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

CHUNK_BYTES = 128 * 2**20
"""Bound on the memory one chunk of the per-used-slot path dequantises with (:func:`slot_work_bytes`
per slot: the gathered parts, the scratch in the model's dtype, float32 work of its largest tensor).

Before chunks, a prefill dequantised every used slot of a layer at once: on the H200 an
OLMoE-1B-7B-sized model at 32 of 64 slots per layer peaked 0.93-1.47 GB above its steady state (int4
slots to a mixed plan, docs/results/decode/decode-olmoe-1b-7b-quantised.json), 30-50% on top of a
1.8-3.3 GB expert budget. 128 MiB is 3 int8 or 4 int4 OLMoE experts (35.8 and 32.9 MB of work each),
4-7% of those budgets, while a chunk's grouped GEMM still sees several experts per launch and a
32-slot prefill takes 8-11 kernel calls per layer, not 32; 64 MiB would hold one int8 OLMoE expert.
An expert whose work exceeds the bound (Mixtral-8x7B: ~1 GB) is a chunk of one, the least any
scheme holds. Outside the bound: the kernel's own temporaries, which grow with ``T*K``, not with the
used slots; and int3's unpacking briefly holds int32 codes as large as the float32 work."""


def slot_work_bytes(layout: Any, parts: Mapping[str, torch.Tensor]) -> int:
    """Bytes one slot adds to a chunk's dequantisation (pure): its parts as stored (``parts``: name ->
    ``[S, ...]``), its tensors in the model's dtypes (the scratch), and float32 work the size of its
    largest tensor (swapmoe.quant.dequantise computes one tensor at a time in float32, then casts)."""
    stored = sum(t[0].numel() * t.element_size() for t in parts.values())
    scratch = sum(torch.Size(s[1:]).numel() * layout.dtypes[n].itemsize for n, s in layout.shapes.items())
    work = 4 * max(torch.Size(s[1:]).numel() for s in layout.shapes.values())
    return stored + scratch + work


def slots_per_chunk(slot_work: int, limit: int = CHUNK_BYTES) -> int:
    """How many slots one chunk holds: as many as fit ``limit`` bytes at ``slot_work`` bytes each
    (:func:`slot_work_bytes`), and at least one."""
    return max(1, limit // slot_work)


def chunk_bounds(used: int, per: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges that cover ``used`` slots ``per`` at a time (the last one may be short)."""
    return [(a, min(a + per, used)) for a in range(0, used, per)]


class QuantisedForward:
    """The ``forward`` of one experts module computing from quantised ``[S, ...]`` parts."""

    def __init__(self, module: nn.Module, layout: Any, parts: dict[str, torch.Tensor],
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self.module = module
        self.layout = layout  # swapmoe.quant.ExpertLayout or swapmoe.mxfp4.Mxfp4Layout
        self.parts = parts  # part name -> [S, ...] on the device: the slots (updated in place by swaps)
        self.num_slots = next(iter(parts.values())).shape[0]
        self.inner = type(module).forward  # transformers' forward: dispatches on the experts implementation
        self.chunk_bytes = chunk_bytes  # bound on one chunk of the per-used-slot path (CHUNK_BYTES)
        self.slot_work = slot_work_bytes(layout, parts)  # what one slot of a chunk costs

    def decode(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dequantised weights of ``slots`` (``[C]`` ids): ``name -> [C, ...]`` in the model's dtypes."""
        return self.layout.decode({n: t[slots] for n, t in self.parts.items()})

    def per_term(self, top_k_index: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The per-term scratch (``T*K <= S``; see the module docstring): ``name -> [T*K, ...]`` and the
        ids renumbered into it (``[T, K]``, ``T*K`` for a skipped term)."""
        S = self.num_slots
        ids = top_k_index.long()
        flat = ids.reshape(-1)  # [T*K]
        valid = flat < S  # [T*K]
        src = flat.clamp(max=S - 1)
        weights = self.layout.decode({n: t[src] for n, t in self.parts.items()})
        # a skipped term's entry reads a slot that may be in flight: zero it ([C] -> [C, 1, ...])
        weights = {n: torch.where(valid.view(-1, *([1] * (w.dim() - 1))), w, torch.zeros((), dtype=w.dtype,
                   device=w.device)) for n, w in weights.items()}
        c = flat.numel()
        new = torch.where(valid, torch.arange(c, device=ids.device), torch.full_like(flat, c))
        return weights, new.view_as(ids)

    def used_slots(self, top_k_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The distinct slots a call chose (``[U]``, ascending; a host sync) and its ids renumbered into
        them (``[T, K]``, ``U`` for a skipped term)."""
        S = self.num_slots
        ids = top_k_index.long()
        flat = ids.reshape(-1)  # [T*K]
        present = torch.zeros(S + 1, dtype=torch.bool, device=ids.device)
        present[flat.clamp(max=S)] = True
        used = present[:S].nonzero().flatten()  # [U] sorted slot ids (host sync: prefill only)
        c = used.numel()
        lut = torch.full((S + 1,), c, dtype=torch.long, device=ids.device)
        lut[used] = torch.arange(c, device=ids.device)
        return used, lut[ids.clamp(max=S)]

    def run(self, weights: dict[str, torch.Tensor], hidden_states: torch.Tensor, ids: torch.Tensor,
            top_k_weights: torch.Tensor, dtype: torch.dtype, *args: Any, **kwargs: Any) -> torch.Tensor:
        """transformers' kernel over the scratch ``weights`` (``name -> [C, ...]``), ids into it."""
        m = self.module
        placeholders = {n: m._parameters[n] for n in weights}
        num_experts = m.num_experts
        try:
            for n, w in weights.items():
                m._parameters[n] = w  # read by the kernel as the module's parameter, for this call only
            m.num_experts = next(iter(weights.values())).shape[0]
            return self.inner(m, hidden_states, ids.to(dtype), top_k_weights, *args, **kwargs)
        finally:
            for n, p in placeholders.items():
                m._parameters[n] = p
            m.num_experts = num_experts

    def chunked(self, used: torch.Tensor, ids: torch.Tensor, hidden_states: torch.Tensor,
                top_k_weights: torch.Tensor, per: int, dtype: torch.dtype, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        """The per-used-slot output computed ``per`` used slots at a time (``ids [T, K]`` into ``used``).

        Each kernel call sees the ``T*K`` terms one per row with weight 1, so its output row ``j`` is
        term ``j``'s expert output alone (a one-term sum with weight 1 is exact); a row is kept from the
        chunk holding its slot, then weighted and summed per token as grouped_mm and batched_mm do
        (``proj_out * weights``, then ``[T, K, H].sum(1)`` and a cast to the hidden states' dtype), so
        float32 routing weights (Mixtral, DeepSeek-V3) still multiply unrounded. This assumes what
        transformers' experts kernels do: a term is its weight times its expert's output.

        Bit for bit the one-call result wherever a term's row does not depend on which other rows the
        call holds: on CPU for grouped_mm and batched_mm (tests/test_qexperts.py), on a GPU as far as
        the grouped GEMM computes an expert's rows alike whatever the other groups are (the CUDA test
        there checks it). The eager kernel adds a token's terms in the model's dtype, one expert after
        another, so there the sum is rounded differently (that file's eager test bounds it).

        Memory: one chunk's work, plus ``[T*K, H]`` rows (the repeated hidden states, the kept outputs,
        each chunk's output), the size of what the kernel allocates per call anyway."""
        T, K = ids.shape
        rows = hidden_states.repeat_interleave(K, dim=0)  # [T*K, H]: term j's token
        term_ids = ids.reshape(-1, 1)  # [T*K, 1] into used (U: skipped)
        ones = torch.ones_like(top_k_weights).reshape(-1, 1)  # [T*K, 1]
        kept: torch.Tensor | None = None  # [T*K, H] each term's expert output
        for a, b in chunk_bounds(used.numel(), per):
            inside = (term_ids >= a) & (term_ids < b)  # [T*K, 1]
            local = torch.where(inside, term_ids - a, torch.full_like(term_ids, b - a))
            out = self.run(self.decode(used[a:b]), rows, local, ones, dtype, *args, **kwargs)
            # rows outside the chunk were skipped (zero); a skipped term stays the first chunk's zero
            kept = out if kept is None else torch.where(inside, out, kept)
        assert kept is not None
        weighted = kept * top_k_weights.reshape(-1, 1)  # [T*K, H] as the kernels weight a term
        return weighted.view(T, K, -1).sum(dim=1).to(hidden_states.dtype)  # [T, H]

    def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        dtype = top_k_index.dtype
        if top_k_index.numel() <= self.num_slots:  # per term: fixed shapes, no host sync (decode, CUDA graphs)
            weights, ids = self.per_term(top_k_index)
            return self.run(weights, hidden_states, ids, top_k_weights, dtype, *args, **kwargs)
        used, ids = self.used_slots(top_k_index)
        if used.numel() == 0:  # every term skipped: one zero entry that no id refers to
            weights = {n: torch.zeros((1, *s[1:]), dtype=self.layout.dtypes[n], device=ids.device)
                       for n, s in self.layout.shapes.items()}
            return self.run(weights, hidden_states, torch.ones_like(ids), top_k_weights, dtype, *args, **kwargs)
        per = slots_per_chunk(self.slot_work, self.chunk_bytes)
        if used.numel() <= per:  # one chunk: the plain call
            return self.run(self.decode(used), hidden_states, ids, top_k_weights, dtype, *args, **kwargs)
        return self.chunked(used, ids, hidden_states, top_k_weights, per, dtype, *args, **kwargs)


def install(module: nn.Module, layout: Any, parts: dict[str, torch.Tensor],
            chunk_bytes: int = CHUNK_BYTES) -> QuantisedForward:
    """Make ``module`` compute from the quantised ``parts`` (its parameters stay empty placeholders)."""
    fwd = QuantisedForward(module, layout, parts, chunk_bytes)
    module.forward = fwd
    module._is_expert_parallel = True  # transformers' kernels skip ids >= num_experts only in this mode
    return fwd
