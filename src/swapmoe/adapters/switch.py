"""Switch Transformers: per-expert ``expert_{i}.wi/wo`` modules as fused, budgeted experts.

The paper's own model. Encoder-decoder; every other feed-forward layer of the encoder *and* the
decoder is a ``SwitchTransformersSparseMLP``: a top-1 router with an *expert capacity* (per
sequence, tokens past an expert's capacity get no expert: the layer adds nothing for them) and
experts kept as separate ``nn.Linear`` modules. This adapter replaces each such block by
:class:`SwitchSparseMoe`:

* the experts become one :class:`SwitchExperts` module with ``up_proj [E, F, D]`` (the ``wi``
  weights) and ``down_proj [E, D, F]`` (``wo``), so the loader can virtualise them like any fused
  family; the budget then covers encoder and decoder experts alike;
* the router is transformers' own (capacity included), wrapped by :class:`SwitchTop1Router` to
  return ``(logits [T, E], weights [T, 1], indices [T, 1])``; it also reports which tokens the
  capacity dropped, and the block keeps those dropped whatever Masked Gating decides, so at a
  100% budget a dropped token behaves exactly as in transformers.

Exactness: the same modules and operations as transformers' loop (``wi``, activation, ``wo``,
times the router probability, ``index_add_`` into zeros), so logits are bit-identical at 100%.
Dropout inside an expert is not applied (swapmoe is for inference; the model is in eval mode).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from swapmoe.adapters.base import SparseExperts, replace_blocks


class SwitchExperts(SparseExperts):
    """``up_proj [E, F, D]`` and ``down_proj [E, D, F]``; output scaled by the router probability."""

    def __init__(self, experts: nn.ModuleDict) -> None:
        num = experts.num_experts
        super().__init__(num)
        first = experts["expert_0"]
        with torch.no_grad():
            self.up_proj = nn.Parameter(torch.stack([experts[f"expert_{i}"].wi.weight for i in range(num)]),
                                        requires_grad=False)
            self.down_proj = nn.Parameter(torch.stack([experts[f"expert_{i}"].wo.weight for i in range(num)]),
                                          requires_grad=False)
        self.act = first.act

    def expert(self, index: int, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = self.act(nn.functional.linear(hidden, self.up_proj[index]))  # [N, F]
        if h.dtype != self.down_proj.dtype:  # as SwitchTransformersDenseActDense does for wo
            h = h.to(self.down_proj.dtype)
        return nn.functional.linear(h, self.down_proj[index]) * weight[:, None]  # [N, D]


class SwitchTop1Router(nn.Module):
    """transformers' top-1 router (with its capacity) in the ``(logits, weights, indices)`` form.

    transformers has changed what this router returns between releases (5.17: ``(probs, one-hot,
    max-probs)`` on flattened tokens; 5.23: ``(one-hot, probs, logits)`` per sequence), so the parts
    are told apart by kind, and the full logits are taken from the classifier itself.
    """

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.inner = router
        self.num_experts = router.num_experts
        self.top_k = 1
        self.norm_topk_prob = False  # the weight is the chosen expert's softmax probability
        self.dropped: torch.Tensor | None = None  # [T] bool of the last call: tokens over capacity
        self._logits: torch.Tensor | None = None
        router.classifier.register_forward_hook(self._keep_logits)

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.classifier.weight  # [E, D]

    def _keep_logits(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._logits = output

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.inner(hidden)  # hidden [B, S, D]: capacity is counted as transformers counts it
        e = self.num_experts
        logits = self._logits.reshape(-1, e)  # [T, E], router dtype (float32)
        dispatch = next(t for t in out if not torch.is_floating_point(t)).reshape(-1, e)  # [T, E] one-hot
        probs = next(t for t in out if torch.is_floating_point(t) and t.shape[-1] == 1).reshape(-1, 1)  # [T, 1]
        self.dropped = dispatch.sum(dim=-1) == 0  # [T]
        preferred = torch.where(self.dropped, logits.argmax(dim=-1), dispatch.argmax(dim=-1))  # [T]
        weights = probs.masked_fill(self.dropped[:, None], 0)  # a dropped token uses no expert
        return logits, weights, preferred[:, None]


class SwitchSparseMoe(nn.Module):
    """Drop-in for ``SwitchTransformersSparseMLP``: ``[B, S, D] -> [B, S, D]``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.router = SwitchTop1Router(block.router)
        self.experts = SwitchExperts(block.experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, d = hidden_states.shape
        _, weights, indices = self.router(hidden_states)  # [T, 1], [T, 1] (slot ids under swapmoe)
        dropped = self.router.dropped[:, None]  # [T, 1]: over capacity, whatever Masked Gating chose
        # "no term": E is past every id the experts module accepts, whether it receives slot ids
        # (S <= E slots, under swapmoe's router hook) or logical ids (on-demand loading)
        indices = indices.masked_fill(dropped, self.router.num_experts)
        weights = weights.masked_fill(dropped, 0)
        return self.experts(hidden_states.reshape(-1, d), indices, weights).reshape(b, s, d)


def adapt(model: nn.Module) -> int:
    """Replace every ``SwitchTransformersSparseMLP`` of ``model`` in place; returns how many."""
    return replace_blocks(model, "SwitchTransformersSparseMLP", SwitchSparseMoe)
