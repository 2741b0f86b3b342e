"""Named policies load the same checkpoint the way a user of each alternative would run it."""

import pytest
import torch

from swapmoe.baselines import POLICIES, load_policy
from swapmoe.errors import SwapMoEError
from tests.tiny_models import VOCAB, make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("base") / "qwen3-moe")


def _run(model, seed=0):
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=40, do_sample=False)


@pytest.mark.parametrize("policy", ["random-keep", "magnitude-keep"])
def test_keep_policies_never_swap(ckpt, policy):
    model = load_policy(policy, ckpt, "50%")
    before = model.swapmoe.resident_sets()
    _run(model)
    assert model.swapmoe.resident_sets() == before
    assert model.swapmoe.stats()["total"]["swaps"] == 0


def test_magnitude_keep_holds_the_largest_experts(ckpt):
    model = load_policy("magnitude-keep", ckpt, "50%")
    for st, resident in zip(model.swapmoe.layers, model.swapmoe.resident_sets(), strict=True):
        top = torch.argsort(st.norms.cpu(), descending=True)[: len(resident)].tolist()
        assert sorted(top) == resident


def test_random_keep_is_seeded(ckpt):
    a = load_policy("random-keep", ckpt, "50%", seed=1).swapmoe.resident_sets()
    b = load_policy("random-keep", ckpt, "50%", seed=1).swapmoe.resident_sets()
    assert a == b


def test_swapmoe_policies_pick_their_strategy(ckpt):
    assert load_policy("swapmoe", ckpt, "50%").swapmoe.config.strategy == "exchange"
    assert load_policy("swapmoe-skip", ckpt, "50%").swapmoe.config.strategy == "skip"
    full = load_policy("full", ckpt, "25%")  # the budget does not apply to the full model
    assert full.swapmoe.stats()["total"]["resident_bytes"] == full.swapmoe.total_expert_bytes


def test_unknown_policy_and_missing_twin_are_clear(ckpt):
    with pytest.raises(SwapMoEError, match="unknown policy 'lru'.*ondemand"):
        load_policy("lru", ckpt, "50%")
    with pytest.raises(SwapMoEError, match="dense twin"):
        load_policy("static", ckpt, "50%")
    if not torch.cuda.is_available():
        with pytest.raises(SwapMoEError, match="needs a CUDA GPU"):
            load_policy("accelerate-offload", ckpt, "50%")
    assert len(POLICIES) == 13
