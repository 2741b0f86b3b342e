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


# ------------------------------------------- the families outside the fused layout, and gpt-oss
NEW_FAMILIES = ("gpt_oss", "llama4_text", "switch_transformers")


def _family_checkpoint(family, path, dtype):
    from tests.adapters import tiny as adapted
    from tests.tiny_models import make_checkpoint

    if family == "gpt_oss":
        return make_checkpoint(family, path, layout="fused", dtype=dtype)
    return adapted.make_checkpoint(family, path, dtype=dtype)


def _run(model, ids):
    if model.config.is_encoder_decoder:
        return model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
    return model(ids).logits


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_new_families_at_full_budget_on_cuda(tmp_path, family):
    from swapmoe.families import auto_model_class

    dtype = torch.bfloat16
    path = _family_checkpoint(family, tmp_path, dtype)
    from transformers import AutoConfig

    plain = auto_model_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=dtype).cuda().eval()
    ours = swapmoe.load(path, "100%", device="cuda", dtype=dtype)
    ids = torch.randint(2, 96, (2, 8), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.inference_mode():
        a, b = _run(plain, ids), _run(ours, ids)
        if family == "llama4_text":  # per-expert products instead of one batched product (docs/families.md)
            torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)
        else:
            assert torch.equal(a, b)
        kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(plain.generate(ids, **kw), ours.generate(ids, **kw))


@pytest.mark.parametrize("strategy", ["exchange", "skip"])
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_new_families_swap_asynchronously_within_budget(tmp_path, family, strategy):
    path = _family_checkpoint(family, tmp_path, torch.bfloat16)
    model = swapmoe.load(path, "50%", device="cuda", strategy=strategy, update_interval=1, swaps_per_update=2)
    ids = torch.randint(2, 96, (1, 8), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.inference_mode():
        for _ in range(2):  # Switch's encoder layers move between requests
            out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
            assert torch.isfinite(_run(model, out)).all()
    model.swapmoe.synchronize()
    stats = model.swapmoe.stats()["total"]
    assert stats["swaps"] > 0 and stats["resident_bytes"] <= model.swapmoe.budget_bytes
    for st in model.swapmoe.layers:
        for s, e in enumerate(st.pool.expert_in):
            for name, t in st.pool.slots.items():
                assert torch.equal(t[s].cpu(), st.pool.store.tensors[name][e])
