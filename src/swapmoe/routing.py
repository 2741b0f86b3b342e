"""Masked Gating: route tokens only to resident experts (pure functions).

Shape legend
    T = tokens in the call, E = logical experts of the layer, K = experts per token (top-k),
    S = slots of the layer (device places for experts); slot id ``S`` is the *sentinel*: a term
    routed to it is not computed (transformers' experts kernels skip ids >= num_experts).

Two strategies for a token whose preferred expert is not resident:

* **exchange**: choose the top-k among resident experts only. The family's own routing rule is
  re-run with non-resident experts masked out of the *choice*; gate weights are read from the full,
  unmasked scores (e.g. the softmax over all ``E`` experts) and renormalised only where the family
  itself renormalises its top-k (Mixtral always, Qwen/OLMoE when ``norm_topk_prob``, DeepSeek-V3
  when ``norm_topk_prob``...). So under exchange a token still gets ``K`` experts.
* **skip**: keep the router's unmasked top-k and drop the terms of non-resident experts (weight 0,
  sentinel slot). The remaining weights are *not* renormalised, so a skipped term is simply missing.

Rules are keyed by name (see :data:`RULES`); each mirrors one family's router from transformers 5.x
with a resident mask ``[E] bool`` applied before selection, and with an all-true mask returns what the
family's router returns. :func:`substitute` is the family-agnostic fallback for routers without a rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


@dataclass(frozen=True)
class RuleParams:
    """Router constants a rule needs, read once from the router module."""

    top_k: int
    norm_topk_prob: bool = True
    out_dtype: torch.dtype | None = None  # None: keep float32 (Mixtral); else cast like the family
    scaling: float = 1.0
    num_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"
    norm_min: float = 0.0
    jitter_eps: float = 0.0
    norm_p: float | None = None  # DBRX: weights divided by their p-norm (None: not renormalised)
    bias: torch.Tensor | None = field(default=None, compare=False)  # [E] score-correction bias


Rule = Callable[[torch.Tensor, torch.Tensor, RuleParams], tuple[torch.Tensor, torch.Tensor]]


def _cast(w: torch.Tensor, p: RuleParams) -> torch.Tensor:
    return w if p.out_dtype is None else w.to(p.out_dtype)


def softmax_topk(logits: torch.Tensor, mask: torch.Tensor, p: RuleParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: softmax over all E, top-k, optional renormalisation."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float)  # [T, E]
    choice = probs.masked_fill(~mask, NEG_INF)  # [T, E]
    _, idx = torch.topk(choice, p.top_k, dim=-1)  # [T, K]
    w = probs.gather(-1, idx)  # [T, K]
    if p.norm_topk_prob:
        w /= w.sum(dim=-1, keepdim=True)
    return _cast(w, p), idx


def softmax_topk_pnorm(logits: torch.Tensor, mask: torch.Tensor, p: RuleParams) -> tuple[torch.Tensor, torch.Tensor]:
    """DBRX: softmax in the logits' own dtype, top-k, weights divided by their ``p``-norm."""
    probs = F.softmax(logits, dim=1, dtype=logits.dtype)  # [T, E]
    top, idx = torch.topk(probs.masked_fill(~mask, NEG_INF), p.top_k, dim=-1)  # [T, K]
    if p.norm_p is not None:
        top = top / torch.norm(top, p=p.norm_p, dim=-1, keepdim=True)
    return top, idx


def topk_softmax(logits: torch.Tensor, mask: torch.Tensor, p: RuleParams) -> tuple[torch.Tensor, torch.Tensor]:
    """GraniteMoE: top-k over logits, softmax over the k chosen (always normalised)."""
    choice = logits.float().masked_fill(~mask, NEG_INF)  # [T, E]
    top, idx = choice.topk(p.top_k, dim=-1)  # [T, K]
    return _cast(torch.softmax(top, dim=-1), p), idx


def topk_softmax_same_dtype(
    logits: torch.Tensor, mask: torch.Tensor, p: RuleParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-OSS: top-k over logits (bias included), softmax over the k chosen in the logits' own dtype.

    Unlike GraniteMoE's router there is no float32 pass: the same call as the router's keeps the
    rule exact by construction, not only where a float32 softmax cast back happens to round alike.
    """
    choice = logits.masked_fill(~mask, NEG_INF)  # [T, E]
    top, idx = choice.topk(p.top_k, dim=-1)  # [T, K]
    return torch.softmax(top, dim=-1, dtype=top.dtype), idx


def topk_sigmoid(logits: torch.Tensor, mask: torch.Tensor, p: RuleParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 4: top-k over logits, each gated by its own sigmoid (computed in float32, no renormalisation)."""
    top, idx = logits.masked_fill(~mask, NEG_INF).topk(p.top_k, dim=-1)  # [T, K]
    return _cast(torch.sigmoid(top.float()), p), idx


def _group_select(choice: torch.Tensor, p: RuleParams, group_score: str) -> torch.Tensor:
    """DeepSeek's group-limited selection: keep the best ``topk_group`` of ``num_group`` groups."""
    t, e = choice.shape
    grouped = choice.view(t, p.num_group, e // p.num_group)  # [T, G, E/G]
    # [T, G]: a group's score is its best expert, or its best two summed (DeepSeek-V3)
    gs = grouped.topk(2, dim=-1)[0].sum(dim=-1) if group_score == "top2sum" else grouped.max(dim=-1).values
    gidx = torch.topk(gs, k=p.topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    gmask = torch.zeros_like(gs).scatter_(1, gidx, 1).bool()  # [T, G]
    return gmask.unsqueeze(-1).expand(-1, p.num_group, e // p.num_group).reshape(t, e)  # [T, E]


def _topk_in_groups(choice: torch.Tensor, in_groups: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k of ``choice [T, E]`` (-inf: not resident) within the selected groups ``in_groups [T, E]``.

    With every expert resident this is the family's own selection. Under a mask the selected groups
    may hold fewer than ``k`` resident experts; the missing picks (which would land on -inf, i.e. on
    non-resident experts, and be dropped) become the best resident experts outside those groups, so
    that exchange still gives every token ``k`` experts.
    """
    vals, idx = torch.topk(choice.masked_fill(~in_groups, NEG_INF), k=k, dim=-1, sorted=False)  # [T, K]
    short = torch.isneginf(vals)  # [T, K]
    outside = torch.topk(choice.masked_fill(in_groups, NEG_INF), k=k, dim=-1).indices  # [T, K] best first
    rank = (short.long().cumsum(dim=-1) - 1).clamp(min=0)  # j-th short pick -> j-th best outsider
    return torch.where(short, outside.gather(1, rank), idx)


def sigmoid_grouped(logits: torch.Tensor, mask: torch.Tensor, p: RuleParams) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3, GLM4-MoE: sigmoid scores + correction bias, group-limited top-k.

    Non-resident experts are masked *before* group selection, so a group with no resident expert
    cannot win a place.
    """
    scores = logits.float().sigmoid()  # [T, E]
    choice = scores + p.bias if p.bias is not None else scores
    choice = choice.masked_fill(~mask, NEG_INF)
    if p.num_group > 1:
        idx = _topk_in_groups(choice, _group_select(choice, p, "top2sum"), p.top_k)  # [T, K]
    else:
        idx = torch.topk(choice, k=p.top_k, dim=-1, sorted=False)[1]  # [T, K]
    w = scores.gather(1, idx)
    if p.norm_topk_prob:
        w /= w.sum(dim=-1, keepdim=True) + 1e-20
    return w * p.scaling, idx


def sigmoid_topk(logits: torch.Tensor, mask: torch.Tensor, p: RuleParams) -> tuple[torch.Tensor, torch.Tensor]:
    """AFMoE: sigmoid scores, choice on scores + correction bias (a sorted top-k, no groups), weights
    from the scores normalised (``+1e-20``) and scaled, in float32."""
    scores = torch.sigmoid(logits.float())  # [T, E]
    choice = scores + p.bias if p.bias is not None else scores
    idx = torch.topk(choice.masked_fill(~mask, NEG_INF), k=p.top_k, dim=1)[1]  # [T, K]
    w = scores.gather(dim=1, index=idx)
    if p.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * p.scaling, idx


def softmax_grouped(logits: torch.Tensor, mask: torch.Tensor, p: RuleParams) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2: softmax, greedy or group-limited greedy top-k, scaled (not renormalised)."""
    scores = logits.float().softmax(dim=-1, dtype=torch.float32)  # [T, E]
    choice = scores.masked_fill(~mask, NEG_INF)
    if p.topk_method == "group_limited_greedy" and p.num_group > 1:
        idx = _topk_in_groups(choice, _group_select(choice, p, "max"), p.top_k)  # [T, K]
    else:
        idx = torch.topk(choice, k=p.top_k, dim=-1, sorted=False)[1]  # [T, K]
    return scores.gather(1, idx) * p.scaling, idx


def softmax_bias(logits: torch.Tensor, mask: torch.Tensor, p: RuleParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Ernie4.5-MoE: softmax, choice on softmax + correction bias, normalised with a floor."""
    probs = F.softmax(logits.float(), dim=-1, dtype=torch.float)  # [T, E]
    choice = probs + p.bias if p.bias is not None else probs
    idx = torch.topk(choice.masked_fill(~mask, NEG_INF), p.top_k, dim=-1)[1]  # [T, K]
    w = probs.gather(-1, idx)
    w = w / torch.clamp(w.sum(dim=-1, keepdim=True), min=p.norm_min)
    return _cast(w, p), idx


def sparsemixer(logits: torch.Tensor, mask: torch.Tensor, p: RuleParams) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE: transformers' own inference-time sparsemixer on logits with non-residents pushed out.

    A finite very negative value (not -inf) keeps sparsemixer's relative-threshold arithmetic free
    of NaNs while guaranteeing the masked experts fall outside its jitter window.
    """
    from transformers.models.phimoe.modeling_phimoe import sparsemixer as _phimoe_sparsemixer

    very_negative = torch.finfo(logits.dtype).min / 4
    masked = logits.masked_fill(~mask, very_negative)
    w, idx = _phimoe_sparsemixer(masked, jitter_eps=p.jitter_eps, training=False, top_k=p.top_k)
    return w, idx


RULES: dict[str, Rule] = {
    "softmax_topk": softmax_topk,
    "softmax_topk_pnorm": softmax_topk_pnorm,
    "topk_softmax": topk_softmax,
    "topk_softmax_same_dtype": topk_softmax_same_dtype,
    "topk_sigmoid": topk_sigmoid,
    "sigmoid_grouped": sigmoid_grouped,
    "sigmoid_topk": sigmoid_topk,
    "softmax_grouped": softmax_grouped,
    "softmax_bias": softmax_bias,
    "sparsemixer": sparsemixer,
}


def substitute(
    logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Family-agnostic exchange: replace each non-resident choice by the best unused resident expert.

    The j-th non-resident choice of a token takes the j-th best resident expert (by router logit)
    that the token did not already choose; its gate weight is kept. Used for routers without a rule.
    """
    t, k = indices.shape
    chosen = torch.zeros(t, logits.shape[-1], dtype=torch.bool, device=logits.device)
    chosen.scatter_(1, indices, True)  # [T, E]
    cand_score = logits.float().masked_fill(~mask | chosen, NEG_INF)  # [T, E]
    cand = cand_score.topk(k, dim=-1).indices  # [T, K] best unused residents
    missing = ~mask[indices]  # [T, K]
    rank = (missing.long().cumsum(dim=-1) - 1).clamp(min=0)  # [T, K] j-th missing -> j
    new = torch.where(missing, cand.gather(1, rank), indices)
    return weights, new


def skip(weights: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Skip strategy: keep the unmasked top-k and zero the weight of non-resident choices."""
    return weights.masked_fill(~mask[indices], 0), indices


def to_slots(
    weights: torch.Tensor, indices: torch.Tensor, slot_of: torch.Tensor, num_slots: int,
    sentinel: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map logical expert ids ``[T, K]`` to slot ids; non-resident terms go to the sentinel, weight 0.

    ``sentinel`` defaults to ``num_slots`` (a term the kernels skip); a kernel that cannot skip gets a
    resident slot instead, whose term then counts nothing because its weight is 0.
    """
    slots = slot_of[indices]  # [T, K], -1 where not resident
    missing = slots < 0
    slots = slots.masked_fill(missing, num_slots if sentinel is None else sentinel)
    return weights.masked_fill(missing, 0), slots


def unpack_router_output(output: Any, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """``(logits, weights, indices, positions)`` from a router's output tuple, whatever its order.

    transformers has changed the order for some families between releases (GraniteMoE returns
    ``(indices, weights, logits)`` in 5.17 and ``(logits, weights, indices)`` in 5.23), so the parts
    are told apart by kind: the integer tensor is the indices, the ``[..., E]`` float the logits.
    ``positions`` lets :func:`repack_router_output` rebuild the caller's order.
    """
    parts = list(output)
    if len(parts) != 3:
        raise TypeError(f"a router must return (logits, weights, indices); got {len(parts)} values")
    i_idx = next(i for i, t in enumerate(parts) if not torch.is_floating_point(t))
    floats = [i for i in range(3) if i != i_idx]
    i_log = next((i for i in floats if parts[i].shape[-1] == num_experts), floats[0])
    if parts[floats[0]].shape[-1] == parts[floats[1]].shape[-1]:
        i_log = floats[0]  # top_k == E: fall back to the usual order (logits before weights)
    i_w = next(i for i in floats if i != i_log)
    return parts[i_log], parts[i_w], parts[i_idx], [i_log, i_w, i_idx]


def repack_router_output(
    logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, positions: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out: list[torch.Tensor] = [logits, logits, logits]
    for value, pos in zip((logits, weights, indices), positions, strict=True):
        out[pos] = value
    return out[0], out[1], out[2]


def masked_route(
    strategy: str,
    rule: Rule | None,
    params: RuleParams | None,
    logits: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor,
    slot_of: torch.Tensor,
    num_slots: int,
    sentinel: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full Masked Gating for one call: the router's unmasked output -> (weights, slot ids) ``[T, K]``."""
    if strategy == "skip":
        w, idx = skip(weights, indices, mask)
    else:
        if rule is not None and params is not None:
            w, idx = rule(logits, mask, params)
        else:
            w, idx = substitute(logits, weights, indices, mask)
        # A token whose own top-k is all resident keeps the router's decision bit for bit: re-running
        # a rule under the mask can still move it (DeepSeek-V3's top-2-sum group scores, PhiMoE's
        # sparsemixer window), though none of its experts is missing.
        hit = mask[indices].all(dim=-1, keepdim=True)  # [T, 1]
        w, idx = torch.where(hit, weights.to(w.dtype), w), torch.where(hit, indices, idx)
    return to_slots(w, idx, slot_of, num_slots, sentinel)
