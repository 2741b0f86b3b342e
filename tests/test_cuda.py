"""The CUDA path (pinned host store, side-stream copies, event-polled commits). Skipped without a GPU;
CI has none, so this runs on the GPU machine (see benchmarks/README.md). The same behaviour on CPU
(synchronous swaps) is covered by tests/test_loader.py."""

import pytest
import torch

import swapmoe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _checkpoint(tmp_path, dtype):
    from transformers import AutoModelForCausalLM, OlmoeConfig

    cfg = OlmoeConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=4, num_experts=16, num_experts_per_tok=4, vocab_size=128,
                      max_position_embeddings=256)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=dtype).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_budget_is_bit_identical_on_cuda(tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    path = _checkpoint(tmp_path, dtype)
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1)).cuda()
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    ours = swapmoe.load(path, "100%", device="cuda", dtype=dtype)
    with torch.inference_mode():
        assert torch.equal(plain(ids).logits, ours(ids).logits)
        a = plain.generate(ids, max_new_tokens=16, do_sample=False)
        b = ours.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", ["exchange", "skip"])
def test_async_swaps_commit_whole_experts_within_budget(tmp_path, strategy):
    path = _checkpoint(tmp_path, torch.bfloat16)
    model = swapmoe.load(path, "40%", device="cuda", strategy=strategy, update_interval=1, swaps_per_update=2)
    budget = model.swapmoe.budget_bytes
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=64, do_sample=False)
        assert out.shape[1] == 72 and torch.isfinite(model(out).logits).all()
    model.swapmoe.synchronize()
    stats = model.swapmoe.stats()
    assert stats["total"]["swaps"] > 0
    assert stats["total"]["resident_bytes"] <= budget
    for st in model.swapmoe.layers:
        pool = st.pool
        assert not pool.pending
        assert sum(t.numel() * t.element_size() for t in pool.slots.values()) == st.resident_bytes()
        slot_of = pool.slot_of.tolist()
        for s, e in enumerate(pool.expert_in):
            assert e >= 0 and slot_of[e] == s
            for name, t in pool.slots.items():  # the slot holds the whole expert, not a torn copy
                assert torch.equal(t[s].cpu(), pool.store.tensors[name][e])
        assert pool.resident.sum().item() == pool.num_slots


def test_sync_and_async_copy_the_same_bytes_per_swap(tmp_path):
    path = _checkpoint(tmp_path, torch.bfloat16)
    model = swapmoe.load(path, "40%", device="cuda", update_interval=1, swaps_per_update=1)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(3)).cuda()
    per_expert = model.swapmoe.layers[0].layer.expert_bytes()
    for enabled in (True, False):
        model.swapmoe.set_async_swaps(enabled)
        model.swapmoe.reset_stats()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=32, do_sample=False)
        model.swapmoe.synchronize()
        tot = model.swapmoe.stats()["total"]
        assert tot["bytes_copied"] == tot["swaps"] * per_expert
