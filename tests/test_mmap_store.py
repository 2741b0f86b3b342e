"""A host budget: experts beyond it stay in the safetensors files and are read one at a time."""

import pytest
import torch

import swapmoe
from tests.tiny_models import FAMILIES, VOCAB, layouts, make_checkpoint


def _generate(model):
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=12, do_sample=False)


@pytest.mark.parametrize(("family", "layout"), [(f, lo) for f in FAMILIES for lo in layouts(f)])
def test_checkpoint_backed_experts_give_the_same_model(tmp_path, family, layout):
    # legacy sharded, fused in one file; a family with only one layout gets it sharded
    sharded = layout == "legacy" or len(layouts(family)) == 1
    ckpt = make_checkpoint(family, tmp_path / family, layout=layout, sharded=sharded)
    kw = {"update_interval": 1, "swaps_per_update": 2}
    held = swapmoe.load(ckpt, "50%", **kw)
    mapped = swapmoe.load(ckpt, "50%", host_budget=1, **kw)  # 1 byte: no layer fits in host memory
    stats = mapped.swapmoe.stats()
    assert {la["expert_store"] for la in stats["layers"]} == {"checkpoint"}
    assert stats["total"]["host_expert_bytes"] == 0
    assert torch.equal(_generate(held), _generate(mapped))
    assert mapped.swapmoe.stats()["total"]["swaps"] == held.swapmoe.stats()["total"]["swaps"] > 0
    # every expert read from the files equals what the host store holds
    for a, b in zip(held.swapmoe.layers, mapped.swapmoe.layers, strict=True):
        for name, t in a.pool.store.tensors.items():
            for e in (0, t.shape[0] - 1):
                assert torch.equal(b.pool.store.expert(name, e), t[e])


def test_host_budget_keeps_whole_first_layers_in_memory(tmp_path):
    ckpt = make_checkpoint("mixtral", tmp_path / "m")  # 2 MoE layers of equal size
    model = swapmoe.load(ckpt, "50%", host_budget="50%")
    stats = model.swapmoe.stats()
    assert [la["expert_store"] for la in stats["layers"]] == ["host", "checkpoint"]
    assert stats["total"]["host_expert_bytes"] == stats["total"]["total_expert_bytes"] // 2
    full = swapmoe.load(ckpt, "100%", host_budget=1)  # full layers need no store at all
    assert {la["expert_store"] for la in full.swapmoe.stats()["layers"]} == {"device"}


def test_cli_takes_a_host_budget(tmp_path, capsys):
    from swapmoe.cli import main

    ckpt = make_checkpoint("qwen3_moe", tmp_path / "q")
    assert main(["info", str(ckpt)]) == 0
    assert main(["generate", str(ckpt), "-m", "50%", "--host-budget", "lots", "-p", "a"]) == 2
    assert "invalid memory budget" in capsys.readouterr().err


@pytest.mark.parametrize(("family", "layout"), [(f, lo) for f in FAMILIES for lo in layouts(f)])
def test_experts_beyond_the_host_budget_are_never_kept_while_loading(tmp_path, family, layout):
    """The streamer hands transformers a meta tensor for each expert parameter of a layer beyond the
    host budget, so the loaded model never holds those experts; the loader then builds the stores
    from the recipes verified during the load."""
    from swapmoe.budget import parse_budget
    from swapmoe.checkpoint import check_checkpoint
    from swapmoe.families import find_moe_layers
    from swapmoe.loader import _expert_streamer, _load_on_host
    from swapmoe.mmap_store import weight_files

    ckpt = check_checkpoint(make_checkpoint(family, tmp_path / family, layout=layout))
    streamer = _expert_streamer(ckpt, parse_budget("50%"), parse_budget("50%"), None, torch.float32, False,
                                weight_files(ckpt.weight_files))
    with streamer:
        model = _load_on_host(ckpt.path, torch.float32, True, False, None)
    layers = find_moe_layers(model)
    # a 50% host budget keeps the first of the two (equal) MoE layers; the second is streamed
    assert sorted(streamer.streamed) == [layers[-1].name]
    for la in layers:
        devices = {getattr(la.experts, n).device.type for n in la.expert_param_names}
        assert devices == ({"meta"} if la is layers[-1] else {"cpu"})
    assert streamer.streamed_bytes == layers[-1].expert_bytes() * layers[-1].num_experts
    # and transformers' loader is as it was
    import transformers.core_model_loading as loading

    assert loading.set_param_for_module.__module__ == "transformers.core_model_loading"


def test_without_the_loading_hook_the_checkpoint_is_loaded_whole(tmp_path, monkeypatch, caplog):
    """A transformers release without the per-parameter hook still loads, with the experts held."""
    import swapmoe.streaming

    ckpt = make_checkpoint("mixtral", tmp_path / "m")
    reference = _generate(swapmoe.load(ckpt, "50%", host_budget=1))
    monkeypatch.setattr(swapmoe.streaming, "loading_hook_module", lambda: None)
    with caplog.at_level("WARNING"):
        model = swapmoe.load(ckpt, "50%", host_budget=1)
    assert "loaded whole" in caplog.text
    assert {la["expert_store"] for la in model.swapmoe.stats()["layers"]} == {"checkpoint"}
    assert torch.equal(_generate(model), reference)


def test_streaming_plans_with_the_dtype_the_load_will_have(tmp_path):
    """A config without a dtype, bf16 weights, dtype "auto": the plan made before loading must count
    bf16 bytes (as the loaded model will) so that exactly the layers beyond the host budget stream."""
    import json

    from swapmoe.inspect import describe

    ckpt = make_checkpoint("mixtral", tmp_path / "m", dtype=torch.bfloat16)
    config = json.loads((ckpt / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (ckpt / "config.json").write_text(json.dumps(config))
    info = describe(ckpt)  # describes what the load will have, in the same dtype
    assert info.dtype == "bfloat16"
    one_layer_bf16 = info.total_expert_bytes // 2
    model = swapmoe.load(ckpt, "50%", host_budget=one_layer_bf16)
    assert next(model.parameters()).dtype == torch.bfloat16
    stats = model.swapmoe.stats()
    assert [la["expert_store"] for la in stats["layers"]] == ["host", "checkpoint"]
    assert stats["total"]["host_expert_bytes"] == one_layer_bf16
    _generate(model)


def test_checkpoint_experts_are_read_by_a_reader_thread_while_their_slot_stays_unmapped(tmp_path):
    """With background reads (on by default with asynchronous CUDA copies) a checkpoint-backed swap
    reads its expert from the files on the swapper's reader thread, off the critical path; until the
    read has landed and been copied, the slot is mapped to nothing (never read half-written)."""
    import threading

    from swapmoe.policy import Swap
    from swapmoe.pool import Swapper

    ckpt = make_checkpoint("qwen3_moe", tmp_path / "q", layout="legacy", sharded=True)
    model = swapmoe.load(ckpt, "50%", host_budget=1, swaps_per_update=0)
    swapper = Swapper(torch.device("cpu"), asynchronous=False, background_reads=True)
    pool = model.swapmoe.layers[0].pool
    store = pool.store
    release, threads = threading.Event(), []
    stage = store.stage

    def slow_stage(expert, pin):
        threads.append(threading.current_thread().name)
        assert release.wait(10), "the test never released the read"
        return stage(expert, pin)

    store.stage = slow_stage
    slot, old = 0, pool.expert_in[0]
    new = next(e for e in range(store.num_experts) if e not in pool.expert_in)
    before = {n: t[slot].clone() for n, t in pool.slots.items()}
    assert swapper.submit(pool, [Swap(slot, old, new)]) == store.expert_bytes()
    assert swapper.poll(pool) == 0 and len(pool.pending) == 1  # the read is still in flight
    assert pool.expert_in[slot] == -1 and not pool.resident[old] and not pool.resident[new]
    assert int(pool.slot_of[old]) == int(pool.slot_of[new]) == -1
    assert all(torch.equal(t[slot], before[n]) for n, t in pool.slots.items())  # nothing written yet
    release.set()
    assert swapper.poll(pool, wait=True) == 1 and not pool.pending
    assert threads and all(name.startswith("swapmoe-read") for name in threads)
    assert pool.expert_in[slot] == new and pool.resident[new] and int(pool.slot_of[new]) == slot
    for name, t in pool.slots.items():
        assert torch.equal(t[slot], store.expert(name, new))
    # the runtime works through it end to end: a decode with swaps, then every map agrees with its slot
    model.swapmoe.swapper = swapper
    model.swapmoe.set_updates(update_interval=1, swaps_per_update=2)
    _generate(model)
    model.swapmoe.synchronize()
    assert model.swapmoe.stats()["total"]["swaps"] > 0
    for st in model.swapmoe.layers:
        p = st.pool
        assert not p.pending and p.resident.nonzero().flatten().tolist() == sorted(p.expert_in)
        for s, e in enumerate(p.expert_in):
            for name, t in p.slots.items():
                assert torch.equal(t[s], p.store.expert(name, e))
