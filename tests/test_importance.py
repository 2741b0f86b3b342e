"""Eq. 1 and its decay with literal tensors: each factor, and the forgetting across steps.

``importance(E_i, X) = sum over tokens x routed to i of ||x|| * G(x)_i * ||E_i||``; after a call of
``T`` tokens ``I <- d**T * I + increment``. Each test pins one factor so that dropping it fails one test
by name (see scripts/mutate.py).
"""

import torch

from swapmoe.importance import (
    accumulate,
    expert_norms,
    expert_sq_norms,
    importance_increment,
    norms_from_squares,
    token_counts,
)

# two tokens, three experts, top-2: token 0 -> experts 0 and 2, token 1 -> experts 2 and 1
INDICES = torch.tensor([[0, 2], [2, 1]])


def test_increment_is_the_product_of_the_three_factors():
    hidden = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # ||x|| = 5, 1
    gates = torch.tensor([[0.5, 0.25], [0.75, 0.125]])
    norms = torch.tensor([2.0, 4.0, 8.0])
    # expert 0: 5 * 0.5 * 2 = 5; expert 1: 1 * 0.125 * 4 = 0.5; expert 2: (5 * 0.25 + 1 * 0.75) * 8 = 16
    assert importance_increment(hidden, gates, INDICES, norms).tolist() == [5.0, 0.5, 16.0]


def test_token_norm_factor():
    """Gates and expert norms all 1: what is left is the sum of ||x|| over the tokens routed to i."""
    hidden = torch.tensor([[6.0, 8.0], [0.0, 2.0]])  # ||x|| = 10, 2
    inc = importance_increment(hidden, torch.ones(2, 2), INDICES, torch.ones(3))
    assert inc.tolist() == [10.0, 2.0, 12.0]


def test_gate_factor():
    """Unit tokens and expert norms: the sum of the unmasked gate weights each expert received."""
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gates = torch.tensor([[0.5, 0.25], [0.75, 0.125]])
    inc = importance_increment(hidden, gates, INDICES, torch.ones(3))
    assert inc.tolist() == [0.5, 0.125, 1.0]


def test_expert_norm_factor():
    """Unit tokens and gates: each expert's tokens counted, scaled by its own ``||E_i||``."""
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    inc = importance_increment(hidden, torch.ones(2, 2), INDICES, torch.tensor([3.0, 5.0, 7.0]))
    assert inc.tolist() == [3.0, 5.0, 14.0]


def test_an_expert_nobody_chose_gets_nothing_and_inputs_are_not_changed():
    hidden = torch.tensor([[3.0, 4.0]])
    gates = torch.tensor([[1.0]])
    inc = importance_increment(hidden, gates, torch.tensor([[1]]), torch.tensor([9.0, 2.0, 9.0]))
    assert inc.tolist() == [0.0, 10.0, 0.0]
    assert hidden.tolist() == [[3.0, 4.0]] and gates.tolist() == [[1.0]]


def test_expert_norms_are_frobenius_over_all_weight_tensors():
    gate_up = torch.tensor([[[3.0, 0.0]], [[1.0, 1.0]], [[0.0, 0.0]]])  # [E=3, 1, 2]
    down = torch.tensor([[[4.0]], [[1.0]], [[2.0]]])  # [E=3, 1, 1]
    assert expert_sq_norms(gate_up).tolist() == [9.0, 2.0, 0.0]
    assert expert_sq_norms(gate_up, chunk_experts=2).tolist() == [9.0, 2.0, 0.0]  # chunking changes nothing
    norms = expert_norms([gate_up, down])
    torch.testing.assert_close(norms, torch.tensor([5.0, 3.0**0.5, 2.0]), rtol=0, atol=0)
    assert norms_from_squares([torch.tensor([9.0, 0.0]), torch.tensor([16.0, 4.0])]).tolist() == [5.0, 2.0]


def test_decay_is_per_token_across_steps():
    imp = torch.tensor([8.0, 0.0])
    accumulate(imp, torch.tensor([0.0, 1.0]), decay=0.5, tokens=3)  # 8 * 0.5**3 = 1
    assert imp.tolist() == [1.0, 1.0]
    accumulate(imp, torch.tensor([0.0, 0.0]), decay=0.5, tokens=1)
    assert imp.tolist() == [0.5, 0.5]
    accumulate(imp, torch.tensor([2.0, 0.0]), decay=0.5, tokens=2)
    assert imp.tolist() == [2.125, 0.125]


def test_one_call_of_t_tokens_forgets_as_much_as_t_calls_of_one():
    one, many = torch.tensor([4.0, 2.0]), torch.tensor([4.0, 2.0])
    accumulate(one, torch.zeros(2), decay=0.5, tokens=4)
    for _ in range(4):
        accumulate(many, torch.zeros(2), decay=0.5, tokens=1)
    assert one.tolist() == many.tolist() == [0.25, 0.125]


def test_no_decay_accumulates_everything():
    imp = torch.tensor([1.0, 2.0])
    accumulate(imp, torch.tensor([0.5, 0.25]), decay=1.0, tokens=1000)
    assert imp.tolist() == [1.5, 2.25]


def test_token_counts_is_the_count_ablation():
    assert token_counts(torch.tensor([[0, 2], [2, 1], [2, 0]]), num_experts=4).tolist() == [2.0, 1.0, 3.0, 0.0]
