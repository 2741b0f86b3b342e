"""LongCat-Flash: routed experts beside *zero-compute* experts.

LongCat-Flash's router chooses top-k among ``E`` routed experts and ``Z`` zero-compute experts (a
zero expert returns its input: ``x * w``, no weights). transformers keeps them in one experts module
whose ``gate_up_proj`` has ``E + Z`` rows (the last ``Z`` are never used) and whose ``down_proj`` has
``E``. Only the ``E`` routed experts hold weights, so only they are virtualised; zero experts are
always "resident" (they cost nothing). Each ``LongcatFlashMoE`` becomes :class:`LongcatSparseMoE`:

* :class:`LongcatExperts`: ``routed_gate_up_proj [E, 2I, H]`` (the rows used) and ``down_proj [E, H, I]``;
* :class:`LongcatRouter`: transformers' router arithmetic (float32 softmax over ``E + Z``, choice on
  scores + correction bias, weights scaled). Its output to the runtime covers the *routed* experts:
  logits ``[T, E]``, and a term that chose a zero expert is reported with weight 0 on the token's
  best routed expert (a harmless placeholder: it adds nothing, whatever Masked Gating does with it).
  The router keeps which terms were zero experts and their weights (:attr:`LongcatRouter.zero`);
* the block sends the placeholders nowhere (id ``E``: no term) and adds the zero experts' identity
  terms itself, after the routed ones, in expert-id order, as transformers' loop does.

Exactness: at 100% the same operations in the same order: bit-identical. Under a budget, a zero
expert is never missing, and the hit rate counts placeholder choices as lookups (of an expert the
token ranks first among the routed ones). Exchange uses generic substitution (no routing rule).
"""

from __future__ import annotations

import torch
from torch import nn

from swapmoe.adapters.base import SparseExperts, replace_blocks


class LongcatExperts(SparseExperts):
    """The ``E`` routed experts: ``routed_gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``.

    ``routed_gate_up_proj`` is named apart from the checkpoint's ``gate_up_proj [E + Z, 2I, H]``, which
    holds rows no expert reads: a host budget then streams ``down_proj`` past host memory while loading
    and keeps ``routed_gate_up_proj`` (the checkpoint tensor has another shape) in host memory.
    """

    def __init__(self, experts: nn.Module) -> None:
        num = experts.num_routed_experts
        super().__init__(num)
        with torch.no_grad():  # the zero experts' rows of gate_up_proj are never read: not kept
            self.routed_gate_up_proj = nn.Parameter(experts.gate_up_proj[:num].clone(), requires_grad=False)
        self.down_proj = experts.down_proj
        self.act_fn = experts.act_fn

    def expert(self, index: int, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        gate, up = nn.functional.linear(hidden, self.routed_gate_up_proj[index]).chunk(2, dim=-1)  # [N, I] each
        return nn.functional.linear(self.act_fn(gate) * up, self.down_proj[index]) * weight[:, None]  # [N, H]


class LongcatRouter(nn.Module):
    """LongCat-Flash's routing; the runtime sees the routed experts only (see the module docstring)."""

    def __init__(self, router: nn.Module, num_routed: int) -> None:
        super().__init__()
        self.classifier = router.classifier  # [E + Z, H] (and a bias where the config has one)
        self.register_buffer("e_score_correction_bias", router.e_score_correction_bias)  # [E + Z]
        self.routed_scaling_factor = router.routed_scaling_factor
        self.num_experts = num_routed
        self.top_k = router.top_k
        # of the last call: which terms chose a zero expert [T, K] bool, the router's ids [T, K] and weights [T, K]
        self.zero: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.classifier.weight[: self.num_experts]  # [E, H]: the routed experts' rows

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = hidden.view(-1, hidden.shape[-1])
        logits = nn.functional.linear(hidden.type(torch.float32), self.classifier.weight.type(torch.float32))
        scores = logits.softmax(dim=-1)  # [T, E + Z]
        choice = scores + self.e_score_correction_bias.unsqueeze(0)
        indices = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]  # [T, K]
        weights = (scores.gather(1, indices) * self.routed_scaling_factor).to(logits.dtype)
        zero = indices >= self.num_experts  # [T, K]
        self.zero = (zero, indices, weights)
        routed = logits[:, : self.num_experts]  # [T, E]
        placeholder = routed.argmax(dim=-1, keepdim=True).expand_as(indices)
        return routed, weights.masked_fill(zero, 0), torch.where(zero, placeholder, indices)


class LongcatSparseMoE(nn.Module):
    """Drop-in for ``LongcatFlashMoE``: ``[..., H] -> [..., H]``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.experts = LongcatExperts(block.experts)
        self.router = LongcatRouter(block.router, self.experts.num_experts)
        self.num_zero = block.experts.zero_expert_num

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden = hidden_states.reshape(-1, shape[-1])  # [T, H]
        _, weights, indices = self.router(hidden)  # [T, K] (slot ids under swapmoe)
        zero, chosen, chosen_weights = self.router.zero
        # placeholders become "no term": E is past every id the experts module accepts (slots or experts)
        out = self.experts(hidden, indices.masked_fill(zero, self.router.num_experts), weights.masked_fill(zero, 0))
        with torch.no_grad():
            zero_ids = torch.unique(chosen[zero]).tolist()  # sorted: transformers adds them in id order
        for z in zero_ids:  # identity experts: x * w, after the routed experts, as transformers' loop
            token, k = torch.where(chosen == z)
            out.index_add_(0, token, (hidden[token] * chosen_weights[token, k, None]).to(out.dtype))
        return out.view(shape)


def adapt(model: nn.Module) -> int:
    """Replace every ``LongcatFlashMoE`` of ``model`` in place; returns how many."""
    return replace_blocks(model, "LongcatFlashMoE", LongcatSparseMoE)
