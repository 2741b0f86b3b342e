"""Computing an experts module whose weights are held quantised, without dequantising them all.

The slots of a quantised layer hold parts (:class:`swapmoe.quant.ExpertLayout`: ``gate_up_proj.q``,
``gate_up_proj.scale``, ...), not the module's parameters. :class:`QuantisedForward` becomes the
module's ``forward``; for each call it

1. gathers the parts of only the slots the call's tokens chose and dequantises them into a scratch
   ``[C, ...]`` tensor per parameter (a temporary of the call);
2. hands transformers' own experts kernel (grouped_mm, batched_mm or eager, whatever the config
   says) the scratch as the module's parameters, with the slot ids renumbered into it and
   ``num_experts = C``; ids of a skipped term (``>= S``) become ``C``, which the kernels skip;
3. puts the empty placeholders back.

Two ways to choose ``C``:

* **per term** (``T*K <= S``, every decode step): scratch entry ``j`` is the ``j``-th (token, choice)
  term, ``C = T*K``. Shapes depend on ``T`` and ``K`` only and nothing is read back to the host, so
  the same code runs inside a captured CUDA graph (its temporaries come from the graph's pool). A
  skipped term's entry is zeroed: its slot may be the target of a copy in flight.
* **per used slot** (``T*K > S``, a prefill): the distinct slots the call chose (``C <= S``), found
  with ``nonzero`` (a host sync; prefills run eagerly).

Either way no more than ``min(T*K, S)`` experts of one layer exist in high precision at a time, and
only for the duration of that layer's call.

    T = tokens, K = experts per token, S = slots (all E experts for a full layer), C = scratch entries
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from swapmoe.quant import ExpertLayout


class QuantisedForward:
    """The ``forward`` of one experts module computing from quantised ``[S, ...]`` parts."""

    def __init__(self, module: nn.Module, layout: ExpertLayout, parts: dict[str, torch.Tensor]) -> None:
        self.module = module
        self.layout = layout
        self.parts = parts  # part name -> [S, ...] on the device: the slots (updated in place by swaps)
        self.num_slots = next(iter(parts.values())).shape[0]
        self.inner = type(module).forward  # transformers' forward: dispatches on the experts implementation

    def gather(self, top_k_index: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Dequantised weights of the chosen slots (``name -> [C, ...]``) and the ids renumbered
        into them (``[T, K]``, ``C`` for a skipped term)."""
        S = self.num_slots
        ids = top_k_index.long()
        flat = ids.reshape(-1)  # [T*K]
        if flat.numel() <= S:  # per term: fixed shapes, no host sync (decode, CUDA graphs)
            valid = flat < S  # [T*K]
            src = flat.clamp(max=S - 1)
            weights = self.layout.decode({n: t[src] for n, t in self.parts.items()})
            # a skipped term's entry reads a slot that may be in flight: zero it ([C] -> [C, 1, ...])
            weights = {n: torch.where(valid.view(-1, *([1] * (w.dim() - 1))), w, torch.zeros((), dtype=w.dtype,
                       device=w.device)) for n, w in weights.items()}
            c = flat.numel()
            new = torch.where(valid, torch.arange(c, device=ids.device), torch.full_like(flat, c))
            return weights, new.view_as(ids)
        present = torch.zeros(S + 1, dtype=torch.bool, device=ids.device)
        present[flat.clamp(max=S)] = True
        used = present[:S].nonzero().flatten()  # [C] sorted slot ids (host sync: prefill only)
        if used.numel() == 0:  # every term skipped: one zero entry that no id refers to
            weights = {n: torch.zeros((1, *s[1:]), dtype=self.layout.dtypes[n], device=ids.device)
                       for n, s in self.layout.shapes.items()}
            return weights, torch.ones_like(ids)
        c = used.numel()
        lut = torch.full((S + 1,), c, dtype=torch.long, device=ids.device)
        lut[used] = torch.arange(c, device=ids.device)
        weights = self.layout.decode({n: t[used] for n, t in self.parts.items()})
        return weights, lut[ids.clamp(max=S)]

    def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        m = self.module
        weights, ids = self.gather(top_k_index)
        placeholders = {n: m._parameters[n] for n in weights}
        num_experts = m.num_experts
        try:
            for n, w in weights.items():
                m._parameters[n] = w  # read by the kernel as the module's parameter, for this call only
            m.num_experts = next(iter(weights.values())).shape[0]
            return self.inner(m, hidden_states, ids.to(top_k_index.dtype), top_k_weights, *args, **kwargs)
        finally:
            for n, p in placeholders.items():
                m._parameters[n] = p
            m.num_experts = num_experts


def install(module: nn.Module, layout: ExpertLayout, parts: dict[str, torch.Tensor]) -> QuantisedForward:
    """Make ``module`` compute from the quantised ``parts`` (its parameters stay empty placeholders)."""
    fwd = QuantisedForward(module, layout, parts)
    module.forward = fwd
    module._is_expert_parallel = True  # transformers' kernels skip ids >= num_experts only in this mode
    return fwd
