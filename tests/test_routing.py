"""Masked Gating with literal tensors: which experts a token gets, with which weight, in which slot."""

import torch

from swapmoe.routing import (
    RuleParams,
    masked_route,
    repack_router_output,
    sigmoid_grouped,
    skip,
    softmax_grouped,
    softmax_topk,
    substitute,
    to_slots,
    topk_softmax,
    topk_softmax_same_dtype,
    unpack_router_output,
)

# one token, 4 experts, preferences 3 > 2 > 1 > 0
LOGITS = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
ALL = torch.ones(4, dtype=torch.bool)
PROBS = torch.softmax(LOGITS, dim=-1)


def test_full_mask_reproduces_plain_topk():
    w, idx = softmax_topk(LOGITS, ALL, RuleParams(top_k=2, norm_topk_prob=False))
    assert idx.tolist() == [[3, 2]]
    assert torch.equal(w, PROBS[:, [3, 2]])


def test_exchange_picks_best_resident_with_unmasked_gate_weight():
    resident = torch.tensor([True, True, False, True])  # expert 2 missing
    w, idx = softmax_topk(LOGITS, resident, RuleParams(top_k=2, norm_topk_prob=False))
    assert idx.tolist() == [[3, 1]]
    # weights come from the full softmax over all 4 experts, not re-softmaxed over residents
    assert torch.equal(w, PROBS[:, [3, 1]])


def test_exchange_renormalises_only_when_the_family_does():
    resident = torch.tensor([True, True, False, True])
    w, _ = softmax_topk(LOGITS, resident, RuleParams(top_k=2, norm_topk_prob=True))
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))


def test_skip_keeps_unmasked_choice_and_drops_missing_term_without_renormalising():
    weights = PROBS[:, [3, 2]]
    indices = torch.tensor([[3, 2]])
    resident = torch.tensor([True, True, False, True])
    w, idx = skip(weights, indices, resident)
    assert idx.tolist() == [[3, 2]]
    assert w[0, 0] == weights[0, 0] and w[0, 1] == 0


def test_to_slots_maps_experts_and_sends_missing_to_sentinel():
    slot_of = torch.tensor([1, -1, -1, 0])  # expert 3 in slot 0, expert 0 in slot 1
    w, slots = to_slots(torch.tensor([[0.75, 0.25]]), torch.tensor([[3, 2]]), slot_of, num_slots=2)
    assert slots.tolist() == [[0, 2]]  # 2 == S: the sentinel, not computed
    assert w.tolist() == [[0.75, 0.0]]


def test_masked_route_exchange_and_skip_end_to_end():
    slot_of = torch.tensor([1, -1, -1, 0])
    resident = slot_of >= 0
    params = RuleParams(top_k=2, norm_topk_prob=False)
    w0, i0 = softmax_topk(LOGITS, ALL, params)
    we, se = masked_route("exchange", softmax_topk, params, LOGITS, w0, i0, resident, slot_of, 2)
    assert se.tolist() == [[0, 1]]  # experts 3 and 0, both resident
    ws, ss = masked_route("skip", softmax_topk, params, LOGITS, w0, i0, resident, slot_of, 2)
    assert ss.tolist() == [[0, 2]] and ws[0, 1] == 0


def test_generic_substitute_swaps_only_missing_choices():
    indices = torch.tensor([[3, 2]])
    weights = torch.tensor([[0.7, 0.3]])
    resident = torch.tensor([True, True, False, True])
    w, idx = substitute(LOGITS, weights, indices, resident)
    assert idx.tolist() == [[3, 1]]  # 2 -> best unused resident (1)
    assert torch.equal(w, weights)


def test_topk_softmax_over_resident_logits():
    resident = torch.tensor([True, True, False, True])
    w, idx = topk_softmax(LOGITS, resident, RuleParams(top_k=2))
    assert idx.tolist() == [[3, 1]]
    torch.testing.assert_close(w, torch.softmax(torch.tensor([[3.0, 1.0]]), dim=-1))


def test_gpt_oss_rule_softmaxes_the_resident_top_k_in_the_logits_dtype():
    logits = LOGITS.bfloat16()
    resident = torch.tensor([True, True, False, True])
    w, idx = topk_softmax_same_dtype(logits, resident, RuleParams(top_k=2))
    assert idx.tolist() == [[3, 1]]
    assert w.dtype == torch.bfloat16  # no float32 result, as GptOssTopKRouter returns
    assert torch.equal(w, torch.softmax(logits[:, [3, 1]], dim=-1, dtype=torch.bfloat16))


def test_grouped_routing_masks_before_group_selection():
    # 4 experts in 2 groups {0,1} {2,3}; group 1 scores best but only expert 0 and 1 are resident
    logits = torch.tensor([[0.0, 0.5, 3.0, 3.0]])
    p = RuleParams(top_k=1, norm_topk_prob=False, num_group=2, topk_group=1)
    _, idx_full = sigmoid_grouped(logits, ALL, p)
    assert idx_full.item() in (2, 3)
    resident = torch.tensor([True, True, False, False])
    _, idx = sigmoid_grouped(logits, resident, p)
    assert idx.item() == 1  # a group with no resident expert cannot win


def test_router_output_order_is_recovered_and_restored():
    logits, weights, indices = LOGITS, torch.tensor([[0.6, 0.4]]), torch.tensor([[3, 2]])
    for order in ([0, 1, 2], [2, 1, 0]):  # transformers 5.23 and GraniteMoE in 5.17
        out = [(logits, weights, indices)[i] for i in order]
        lg, w, ix, pos = unpack_router_output(tuple(out), num_experts=4)
        assert lg is logits and w is weights and ix is indices
        assert [t is o for t, o in zip(repack_router_output(lg, w, ix, pos), out, strict=True)] == [True] * 3


def test_exchange_weight_is_the_unmasked_probability_not_a_softmax_over_residents():
    # a resident-only softmax would give expert 1 more weight than the full softmax does
    resident = torch.tensor([True, True, False, False])
    w, idx = softmax_topk(LOGITS, resident, RuleParams(top_k=1, norm_topk_prob=False))
    assert idx.tolist() == [[1]] and torch.equal(w, PROBS[:, [1]])


def test_substitute_gives_two_missing_choices_two_different_residents():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    resident = torch.tensor([True, True, True, False, False])
    w, idx = substitute(logits, torch.tensor([[0.625, 0.375]]), torch.tensor([[4, 3]]), resident)
    assert idx.tolist() == [[2, 1]]  # best resident first, then the next best
    assert w.tolist() == [[0.625, 0.375]]


def test_a_token_whose_choices_are_all_resident_keeps_the_routers_decision():
    """Under exchange, a hit token keeps the router's own weights and ids bit for bit, even where the
    rule would compute them differently; only tokens with a missing choice are re-routed."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    router_w = torch.tensor([[0.7, 0.3], [0.7, 0.3]])  # not the softmax: the rule would give other values
    router_i = torch.tensor([[3, 0], [3, 2]])
    slot_of = torch.tensor([1, -1, -1, 0])
    params = RuleParams(top_k=2, norm_topk_prob=False)
    w, slots = masked_route("exchange", softmax_topk, params, logits, router_w, router_i, slot_of >= 0, slot_of, 2)
    assert slots[0].tolist() == [0, 1] and w[0].tolist() == router_w[0].tolist()  # hit: untouched
    probs = torch.softmax(logits[1], dim=-1)
    assert slots[1].tolist() == [0, 1] and torch.equal(w[1], probs[[3, 0]])  # miss: the rule's choice


def test_to_slots_uses_the_given_sentinel_with_weight_zero():
    slot_of = torch.tensor([1, -1, -1, 0])
    w, slots = to_slots(torch.tensor([[0.75, 0.25]]), torch.tensor([[3, 2]]), slot_of, num_slots=2, sentinel=0)
    assert slots.tolist() == [[0, 0]] and w.tolist() == [[0.75, 0.0]]


def test_skip_never_reroutes_and_zeroes_every_missing_term():
    weights = torch.tensor([[0.5, 0.375, 0.125]])
    indices = torch.tensor([[3, 2, 1]])
    slot_of = torch.tensor([-1, -1, 0, -1])
    w, slots = masked_route("skip", softmax_topk, RuleParams(top_k=3), LOGITS, weights, indices,
                            slot_of >= 0, slot_of, 1)
    assert slots.tolist() == [[1, 0, 1]] and w.tolist() == [[0.0, 0.375, 0.0]]  # weights not renormalised


def test_grouped_rules_scale_and_normalise():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    p = RuleParams(top_k=2, norm_topk_prob=True, scaling=2.5)
    w, idx = sigmoid_grouped(logits, ALL, p)
    assert sorted(idx[0].tolist()) == [2, 3]
    torch.testing.assert_close(w.sum(), torch.tensor(2.5))  # normalised to 1, then scaled
    s = torch.sigmoid(logits[0, idx[0]])
    torch.testing.assert_close(w[0], s / s.sum() * 2.5)
    w2, idx2 = softmax_grouped(logits, ALL, RuleParams(top_k=2, scaling=1.5))
    torch.testing.assert_close(w2[0], torch.softmax(logits[0], dim=-1)[idx2[0]] * 1.5)  # scaled, not normalised


def test_group_limited_selection_fills_a_short_group_from_outside():
    """DeepSeek-V2's group-limited greedy: the best group holds one resident expert but top-2 is asked;
    the second pick is the best resident outside the chosen groups, never a non-resident one."""
    logits = torch.tensor([[3.0, 3.0, 0.0, 0.5]])  # groups {0, 1} and {2, 3}; expert 1 not resident
    resident = torch.tensor([True, False, True, True])
    p = RuleParams(top_k=2, norm_topk_prob=False, num_group=2, topk_group=1, topk_method="group_limited_greedy")
    w, idx = softmax_grouped(logits, resident, p)
    order = idx[0].argsort()
    assert idx[0][order].tolist() == [0, 3]
    assert torch.equal(w[0][order], torch.softmax(logits[0], dim=-1)[[0, 3]])


def test_grouped_selection_scores_groups_by_their_resident_experts():
    """Groups {0,1} {2,3} {4,5}; the best group has no resident expert. Masked before selection, the
    group whose *resident* experts score best ({4,5}: 0.73 + 0.73) wins over the group holding the
    single best resident ({2,3}: 0.88 + 0.12); masking after selection would pick 2 and 4 instead."""
    logits = torch.tensor([[5.0, 5.0, 2.0, -2.0, 1.0, 1.0]])
    resident = torch.tensor([False, False, True, True, True, True])
    p = RuleParams(top_k=2, norm_topk_prob=False, num_group=3, topk_group=1)
    _, idx = sigmoid_grouped(logits, resident, p)
    assert sorted(idx[0].tolist()) == [4, 5]
