"""Expert importance, the paper's Eq. 1 (pure functions).

``importance(E_i, X) = sum over tokens x routed to i of ||x|| * G(x)_i * ||E_i||``

Routing here is the router's *unmasked* top-k, so experts that are not resident (and therefore
receive no tokens under the mask) are scored as if they were: that is what lets the scheduler notice
that a missing expert has become important. Scores are accumulated over time with a per-token
decay ``d``: after a call of ``T`` tokens, ``I <- d**T * I + increment``.
"""

from __future__ import annotations

import torch


def expert_sq_norms(param: torch.Tensor, chunk_experts: int = 1) -> torch.Tensor:
    """``[E]``: each expert's squared Frobenius norm in one ``[E, ...]`` weight tensor.

    Computed a few experts at a time, so a float32 copy of the whole tensor (twice a bf16 layer)
    never exists; the loader and the checkpoint streamer use this same function, so both paths give
    the same norms to the last bit.
    """
    e = param.shape[0]
    parts = [param[i : i + chunk_experts].detach().float().reshape(min(chunk_experts, e - i), -1).pow(2).sum(dim=1)
             for i in range(0, e, chunk_experts)]
    return torch.cat(parts)


def norms_from_squares(squares: list[torch.Tensor]) -> torch.Tensor:
    """``||E_i||`` ``[E]`` from each weight tensor's per-expert squared norms (``[E]`` each)."""
    assert squares, "an experts module has at least one weight tensor"
    return torch.stack(squares).sum(dim=0).sqrt()


def expert_norms(params: list[torch.Tensor]) -> torch.Tensor:
    """``||E_i||``: Frobenius norm over all weight tensors of each expert. Inputs are ``[E, ...]``."""
    return norms_from_squares([expert_sq_norms(p) for p in params])


def importance_increment(
    hidden: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, norms: torch.Tensor
) -> torch.Tensor:
    """Eq. 1 for one call: ``hidden [T, H]``, unmasked gate ``weights``/``indices [T, K]``, ``norms [E]``."""
    x_norm = hidden.detach().float().norm(dim=-1)  # [T]
    contrib = x_norm.unsqueeze(-1) * weights.detach().float()  # [T, K]
    inc = torch.zeros_like(norms, dtype=torch.float32)  # [E]
    inc.index_add_(0, indices.reshape(-1), contrib.reshape(-1))
    return inc * norms


def accumulate(importance: torch.Tensor, increment: torch.Tensor, decay: float, tokens: int) -> None:
    """In place: ``importance <- decay**tokens * importance + increment`` (no host sync)."""
    if decay != 1.0:
        importance.mul_(decay**tokens)
    importance.add_(increment)


def token_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert ``[E]`` (the "importance by token count" ablation)."""
    return torch.bincount(indices.reshape(-1), minlength=num_experts).float()
