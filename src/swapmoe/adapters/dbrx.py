"""DBRX: experts kept as 2-D ``[E*I, H]`` tensors under ``ffn.experts.mlp``, a router that returns logits.

transformers' ``DbrxFFN`` keeps all experts' weights as three 2-D parameters ``w1``, ``v1``, ``w2``
of shape ``[E*I, H]`` (expert ``e`` is rows ``e*I:(e+1)*I``), and routes in the block itself
(``route_tokens_to_experts``), so neither the experts nor the router have the fused form. This adapter
replaces each ``DbrxFFN`` by :class:`DbrxSparseFFN`:

* :class:`DbrxExperts3D` views the same storage as ``w1, v1, w2 [E, I, H]`` (no copy) and computes
  one expert as transformers does: ``act(x w1^T) * (x v1^T)``, times ``w2`` (not transposed);
* :class:`DbrxTopKRouter` holds the router's ``[E, H]`` weight and returns ``(logits, weights,
  indices)``: softmax in the logits' dtype, top-k, weights divided by their ``p``-norm
  (``moe_normalize_expert_weights``); exchange rule ``softmax_topk_pnorm``.

Exactness: the same operations on the same weights, one expert at a time over its routed tokens, as
in transformers' own loop, so logits are bit-identical at 100%. With a host budget, the checkpoint's
2-D names do not match the 3-D parameters, so those layers stay in host memory (with a warning).
"""

from __future__ import annotations

import torch
from torch import nn

from swapmoe.adapters.base import SparseExperts, replace_blocks


class DbrxExperts3D(SparseExperts):
    """``w1``, ``v1``, ``w2`` as ``[E, I, H]`` views of transformers' ``[E*I, H]`` parameters."""

    k_major = True  # DBRX's loop takes an expert's rows by choice rank, then token

    def __init__(self, experts: nn.Module) -> None:
        num = experts.num_experts
        super().__init__(num)
        mlp = experts.mlp
        shape = (num, experts.ffn_hidden_size, experts.hidden_size)  # [E, I, H]
        for name in ("w1", "v1", "w2"):
            setattr(self, name, nn.Parameter(getattr(mlp, name).detach().view(shape), requires_grad=False))
        self.act = mlp.activation_fn

    def expert(self, index: int, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        gate = self.act(hidden.matmul(self.w1[index].T))  # [N, I]
        up = hidden.matmul(self.v1[index].T)  # [N, I]
        return (gate * up).matmul(self.w2[index]) * weight[:, None]  # [N, H]


class DbrxTopKRouter(nn.Module):
    """DBRX's routing in the ``(logits [T, E], weights [T, K], indices [T, K])`` form."""

    def __init__(self, router: nn.Module, top_k: int, p: float | None) -> None:
        super().__init__()
        self.weight = router.layer.weight  # [E, H]
        self.num_experts = self.weight.shape[0]
        self.top_k = top_k
        self.norm_p = p  # None: no renormalisation

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = nn.functional.linear(hidden.view(-1, hidden.shape[-1]), self.weight)  # [T, E]
        probs = torch.nn.functional.softmax(logits, dim=1, dtype=logits.dtype)
        top, indices = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        if self.norm_p is not None:
            top = top / torch.norm(top, p=self.norm_p, dim=-1, keepdim=True)
        return logits, top, indices


class DbrxSparseFFN(nn.Module):
    """Drop-in for ``DbrxFFN``: ``[B, S, H] -> [B, S, H]``, only the routed experts computed."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.router = DbrxTopKRouter(block.router, block.top_k, block.moe_normalize_expert_weights)
        self.experts = DbrxExperts3D(block.experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, h = hidden_states.shape
        hidden = hidden_states.reshape(-1, h)  # [T, H]
        _, weights, indices = self.router(hidden)  # [T, K] each (slot ids under swapmoe)
        return self.experts(hidden, indices, weights).view(b, s, h)


def adapt(model: nn.Module) -> int:
    """Replace every ``DbrxFFN`` of ``model`` in place; returns how many."""
    return replace_blocks(model, "DbrxFFN", DbrxSparseFFN)
