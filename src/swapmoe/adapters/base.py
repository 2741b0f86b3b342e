"""What every family adapter builds on: a sparse experts module, and swapping blocks in place.

Shape legend
    T = tokens in the call, K = experts per token, H = hidden size, S = experts held (all ``E``
    experts at a 100% budget, or the ``S`` device slots of a virtualised layer).

transformers' fused experts modules take ``(hidden [T, H], ids [T, K], weights [T, K])`` and skip
ids ``>= num_experts``; swapmoe's loader and runtime are built on that contract. A family adapter
converts its family's experts into a :class:`SparseExperts` subclass holding the same weights as
``[E, ...]`` parameters and defining one expert's computation (:meth:`SparseExperts.expert`), so
the loader can swap its parameters for ``[S, ...]`` slot tensors as for any fused family.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class SparseExperts(nn.Module):
    """``E`` experts as fused ``[E, ...]`` parameters; computes only the (token, expert) pairs asked for."""

    # the order of an expert's rows: token by token (False), or by choice rank k, then token (True), as
    # a family's own loop orders them; CPU matmul kernels may round a row differently at another position
    k_major = False

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts

    def expert(self, index: int, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Weighted output ``[N, H]`` of expert ``index`` for ``hidden [N, H]`` with gate ``weight [N]``."""
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``hidden [T, H]``, ``indices [T, K]`` (ids >= num_experts: no term), ``weights [T, K]`` -> ``[T, H]``.

        The loop mirrors transformers' eager experts loop (one pass per expert that has tokens, the
        terms added with ``index_add_``), so a family's own per-expert loop is reproduced bit for bit.
        """
        out = torch.zeros_like(hidden)  # [T, H]
        with torch.no_grad():
            used = torch.unique(indices[indices < self.num_experts]).tolist()  # sorted expert ids
        for e in used:
            if self.k_major:
                k, token = torch.where(e == indices.T)  # [N], [N]
            else:
                token, k = torch.where(indices == e)  # [N], [N]
            y = self.expert(e, hidden[token], weights[token, k])  # [N, H]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def replace_blocks(model: nn.Module, class_name: str, convert: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every submodule of class ``class_name`` by ``convert(it)``, in place; returns how many.

    Matched by class name so that an adapter needs no import of the family's modeling module (and
    a converted block, of another class, is never converted twice).
    """
    targets = [(name, m) for name, m in model.named_modules() if type(m).__name__ == class_name]
    for name, block in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, convert(block))
    return len(targets)
