"""Sampling: greedy, nucleus, and a private generator per request (same seed, same token)."""

import torch

from swapmoe.engine.sampling import make_generator, sample_token, top_logprobs

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.9])


def test_temperature_zero_is_argmax():
    assert sample_token(LOGITS, 0.0, 1.0, make_generator(0)) == 1


def test_same_seed_same_tokens_and_global_rng_untouched():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = [sample_token(LOGITS, 1.0, 1.0, g) for g in [make_generator(7)] for _ in range(20)]
    b = [sample_token(LOGITS, 1.0, 1.0, g) for g in [make_generator(7)] for _ in range(20)]
    assert a == b and len(set(a)) > 1
    assert torch.equal(before, torch.get_rng_state())


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.softmax(LOGITS, dim=-1)  # about [.04, .37, .14, .03, .34]
    assert probs[1] + probs[4] > 0.7
    gen = make_generator(3)
    drawn = {sample_token(LOGITS, 1.0, 0.7, gen) for _ in range(200)}
    assert drawn == {1, 4}
    assert {sample_token(LOGITS, 1.0, 0.0, gen) for _ in range(20)} == {1}  # top_p 0: the top token


def test_sampling_follows_the_distribution():
    gen = make_generator(11)
    counts = torch.bincount(torch.tensor([sample_token(LOGITS, 1.0, 1.0, gen) for _ in range(4000)]), minlength=5)
    assert torch.allclose(counts / 4000, torch.softmax(LOGITS, dim=-1), atol=0.03)


def test_top_logprobs_best_first():
    lp = torch.log_softmax(LOGITS, dim=-1)
    top = top_logprobs(lp, 2)
    assert [i for i, _ in top] == [1, 4] and top[0][1] == float(lp[1])
    assert top_logprobs(lp, 0) == []
    assert len(top_logprobs(lp, 99)) == 5
