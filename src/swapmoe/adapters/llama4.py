"""Llama 4 (text): sparse, budgeted experts instead of transformers' dense all-experts pass.

transformers' ``Llama4TextMoe`` multiplies *every* token by *every* expert (unselected experts get
a zero input through a zero score), so its memory and compute do not follow any budget. This
adapter replaces each such block by :class:`Llama4SparseMoe`, which keeps the same weights, the
same router and the same shared expert, and computes only the experts a token was routed to.

Two Llama 4 details it keeps:

* the router takes the top-k *logits* and gates with ``sigmoid`` of them (no softmax, no
  renormalisation): routing rule ``topk_sigmoid``;
* the gate scales the expert's *input*, not its output: ``expert(x * w)``.

Exactness: the shared expert, router and residual are transformers' own, and every expert output
is computed with the same weights and the same operations. Only the matrix products differ in
shape (``[N, H] @ [H, 2I]`` for the ``N`` routed tokens instead of one ``[E, T, H]`` batched
product), and CPU float32 kernels round such products differently in the last bit, so at a 100%
budget logits match transformers to float rounding (tested with ``rtol=1e-5``), not bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from swapmoe.adapters.base import SparseExperts, replace_blocks

# experts modules that transformers runs densely; swapmoe must not virtualise them as they are
DENSE_EXPERTS = ("Llama4TextExperts",)


class Llama4Experts(SparseExperts):
    """``gate_up_proj [E, H, 2I]`` (gate and up halves), ``down_proj [E, I, H]``, input-scaled gate."""

    def __init__(self, dense: nn.Module) -> None:
        super().__init__(dense.num_experts)
        self.gate_up_proj = dense.gate_up_proj
        self.down_proj = dense.down_proj
        self.act_fn = dense.act_fn

    def expert(self, index: int, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x = hidden * weight[:, None]  # [N, H]: Llama 4 gates the input
        gate, up = (x @ self.gate_up_proj[index]).chunk(2, dim=-1)  # [N, I] each
        return (up * self.act_fn(gate)) @ self.down_proj[index]  # [N, H]


class Llama4TopKRouter(nn.Module):
    """The Llama 4 router returning ``(logits [T, E], weights [T, K], indices [T, K])``.

    Same weight and same arithmetic as ``Llama4Router``: top-k of the logits, gated by their sigmoid
    computed in float32 and cast back to the logits' dtype.
    """

    def __init__(self, router: nn.Linear) -> None:
        super().__init__()
        self.weight = router.weight  # [E, H]; the checkpoint's name stays "...router.weight"
        self.num_experts = router.num_experts
        self.top_k = router.top_k

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = nn.functional.linear(hidden, self.weight)  # [T, E]
        top, indices = torch.topk(logits, self.top_k, dim=-1)  # [T, K]
        return logits, torch.sigmoid(top.float()).to(logits.dtype), indices


class Llama4SparseMoe(nn.Module):
    """Drop-in for ``Llama4TextMoe``: shared expert + the routed experts only; returns ``(out, logits)``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.hidden_dim = block.hidden_dim
        self.router = Llama4TopKRouter(block.router)
        self.experts = Llama4Experts(block.experts)
        self.shared_expert = block.shared_expert

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = hidden_states.reshape(-1, self.hidden_dim)  # [T, H]
        logits, weights, indices = self.router(hidden)  # [T, E], [T, K], [T, K] (slot ids under swapmoe)
        out = self.shared_expert(hidden)  # [T, H], always resident (not an expert of the budget)
        out.add_(self.experts(hidden, indices, weights))
        return out, logits


def adapt(model: nn.Module) -> int:
    """Replace every ``Llama4TextMoe`` block of ``model`` in place; returns how many."""
    return replace_blocks(model, "Llama4TextMoe", Llama4SparseMoe)
