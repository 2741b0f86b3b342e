"""JetMoE: the MoE MLP's ``ParallelExperts`` and top-k gating as fused, budgeted experts.

JetMoE has two kinds of experts: a mixture of *attention* experts (``JetMoeMoA``) and a mixture of
MLP experts (``JetMoeMoE``). Only the MLP experts are virtualised: the attention experts stay dense
(they are small, and their compute is interleaved with attention), counted with the non-expert
weights. Each ``JetMoeMoE`` is replaced by :class:`JetMoeSparseMoE`:

* :class:`JetMoeExperts` holds the same ``input_linear [E, 2I, H]`` and ``output_linear [E, H, I]``
  weights and computes one expert as transformers does (``act(first half) * second half``);
* :class:`JetMoeTopKRouter` returns ``(logits, weights, indices)``: top-k of the float32 logits,
  softmax over the k chosen, cast to the hidden states' dtype (GraniteMoE's rule ``topk_softmax``);
* the block adds the MoE's output bias after the experts, as transformers does.

Exactness: the same operations per expert and per token; transformers sorts the (token, expert) pairs
by expert and adds them in one pass, this adapter adds them one expert at a time in the same expert
order, so each token's terms are summed in the same order (bit-identical at 100% in float32).
"""

from __future__ import annotations

import torch
from torch import nn

from swapmoe.adapters.base import SparseExperts, replace_blocks


class JetMoeExperts(SparseExperts):
    """``input_linear [E, 2I, H]`` and ``output_linear [E, H, I]``, output scaled by the gate."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block.input_linear.num_experts)
        self.input_linear = block.input_linear.weight
        self.output_linear = block.output_linear.weight
        self.act = block.activation

    def expert(self, index: int, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        first, second = nn.functional.linear(hidden, self.input_linear[index]).chunk(2, dim=-1)  # [N, I] each
        out = nn.functional.linear(self.act(first) * second, self.output_linear[index])  # [N, H]
        return out * weight[:, None]


class JetMoeTopKRouter(nn.Module):
    """``JetMoeTopKGating``'s decision in the ``(logits [T, E], weights [T, K], indices [T, K])`` form."""

    def __init__(self, gating: nn.Module) -> None:
        super().__init__()
        self.weight = gating.layer.weight  # [E, H]
        self.num_experts = gating.num_experts
        self.top_k = gating.top_k

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
        logits = nn.functional.linear(hidden, self.weight).float()  # [T, E]
        top, indices = logits.topk(self.top_k, dim=1)  # [T, K]
        return logits, torch.softmax(top, dim=1).type_as(hidden), indices


class JetMoeSparseMoE(nn.Module):
    """Drop-in for ``JetMoeMoE``: ``[B, S, H] -> [B, S, H]``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.router = JetMoeTopKRouter(block.router)
        self.experts = JetMoeExperts(block)
        self.bias = block.bias  # [H], added after the experts

    def forward(self, layer_input: torch.Tensor) -> torch.Tensor:
        b, s, h = layer_input.shape
        hidden = layer_input.reshape(-1, h)  # [T, H]
        _, weights, indices = self.router(hidden)  # [T, K] each (slot ids under swapmoe)
        return self.experts(hidden, indices, weights).view(b, s, h) + self.bias


def adapt(model: nn.Module) -> int:
    """Replace every ``JetMoeMoE`` (the MLP experts) of ``model`` in place; returns how many."""
    return replace_blocks(model, "JetMoeMoE", JetMoeSparseMoE)
