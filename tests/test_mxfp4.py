"""Checkpoints published in MXFP4 (gpt-oss): the codec, the format's bytes, the load, swaps, and refusals."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Mxfp4Config

import swapmoe
from swapmoe import mxfp4
from swapmoe.errors import CheckpointError
from tests.memory import bookkeeping_allowance, experts_storages, held_storages
from tests.mxfp4_models import make_mxfp4_checkpoint
from tests.tiny_models import VOCAB

# every e2m1 code 0..15 in order, two per byte, low nibble first
ALL_CODES = torch.tensor([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE] * 2, dtype=torch.uint8)
ALL_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0] * 2
# int8 converted from MXFP4 at 100% against transformers' decoded model, tiny gpt-oss (bf16, logits up
# to 0.34-0.40), 24 tokens, seeds 0-2: measured largest |logit difference| 0.0020-0.0034, mean 0.0003-0.0004
# (int4: largest 0.007-0.067)
INT8_MAX_LOGIT_TOL = 0.01


# ---------------------------------------------------------------------------------------- the codec
def test_decode_reads_codes_low_nibble_first_times_the_e8m0_scale():
    blocks = ALL_CODES.view(1, 16)  # [G=1, 16]
    for s, factor in ((127, 1.0), (128, 2.0), (120, 2.0 ** -7)):
        got = mxfp4.decode(blocks, torch.tensor([s], dtype=torch.uint8), torch.float32)
        assert got.tolist() == [v * factor for v in ALL_VALUES]
    tiny = mxfp4.decode(blocks, torch.tensor([0], dtype=torch.uint8), torch.float32)  # 2**-127: subnormal
    assert tiny[7].item() == 6.0 * 2.0 ** -127 and tiny[1].item() == 2.0 ** -128
    huge = mxfp4.decode(blocks, torch.tensor([254], dtype=torch.uint8), torch.float32)
    assert huge[3].item() == 1.5 * 2.0 ** 127


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_is_bit_for_bit_transformers_dequantisation(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), dtype=torch.uint8, generator=gen)  # [E, out, G, 16]
    scales = torch.randint(0, 255, (3, 10, 4), dtype=torch.uint8, generator=gen)  # every finite e8m0
    want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, in, out], as the module holds it
    got = mxfp4.decode_expert(blocks, scales, dtype)
    assert got.dtype == dtype and torch.equal(got, want)


def test_encode_round_trips_values_on_the_grid_and_rounds_others_to_the_nearest():
    grid = torch.tensor(ALL_VALUES) * 2.0 ** -3  # one block, already MXFP4 (scale 2**-3)
    blocks, scales = mxfp4.encode(grid.view(1, 32))
    codes = ALL_CODES.clone()
    codes[[4, 12]] = 0x90  # -0.0 is written as +0.0 (code 8 -> 0)
    assert scales.view(-1).tolist() == [127 - 3] and torch.equal(blocks.view(16), codes)
    assert torch.equal(mxfp4.decode(blocks, scales, torch.float32).view(32), grid)
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    b, s = mxfp4.encode(w)
    back = mxfp4.decode(b, s, torch.float32)
    scale = mxfp4._e8m0_values(s).repeat_interleave(32, -1)  # [4, 64]
    assert (w.abs() / scale).max() <= 6  # the smallest scale that clips nothing
    assert ((back - w).abs() <= scale).all()  # within half of the widest gap (4 -> 6) of the grid
    assert torch.equal(back.sign()[back != 0], w.sign()[back != 0])


def test_layout_bytes_of_a_published_gpt_oss_20b_expert():
    # gpt-oss-20b: hidden 2880, expert intermediate 2880, biases bfloat16
    shapes = {"gate_up_proj": (32, 2880, 5760), "gate_up_proj_bias": (32, 5760), "down_proj": (32, 2880, 2880),
              "down_proj_bias": (32, 2880)}
    layout = mxfp4.Mxfp4Layout(shapes, dict.fromkeys(shapes, torch.bfloat16))
    parts = layout.parts()
    assert parts["gate_up_proj.blocks"] == ((32, 5760, 90, 16), torch.uint8)  # as the published files hold it
    assert parts["down_proj.scales"] == ((32, 2880, 90), torch.uint8)
    assert layout.expert_bytes() == (5760 + 2880) * 90 * 17 + (5760 + 2880) * 2 == 13_236_480  # 4.25 bits a weight


# ------------------------------------------------------------------------------------------ loading
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_mxfp4_checkpoint(tmp_path_factory.mktemp("mxfp4") / "gpt-oss")


@pytest.fixture(scope="module")
def reference(ckpt):
    """The model transformers builds from the same files, decoding MXFP4 to bfloat16."""
    return AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=Mxfp4Config(dequantize=True)).eval()


IDS = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))


def _logits(model, ids=IDS):
    with torch.inference_mode():
        return model(ids).logits


def _slots_hold_the_files_parts(model, ckpt):
    """Every slot holds, byte for byte, the checkpoint's blocks and scales of the expert mapped to it."""
    from safetensors.torch import load_file

    files = load_file(str(ckpt / "model.safetensors"))
    for st in model.swapmoe.layers:
        slots = st.pool.slots if st.pool is not None else st.layer.experts.forward.parts
        experts = st.pool.expert_in if st.pool is not None else range(st.layer.num_experts)
        for s, e in enumerate(experts):
            for part in ("gate_up_proj.blocks", "gate_up_proj.scales", "down_proj.blocks", "down_proj.scales"):
                name, kind = part.split(".")
                assert torch.equal(slots[part][s], files[f"{st.layer.name}.experts.{name}_{kind}"][e])


def test_whole_model_equals_transformers_dequantised_bit_for_bit(ckpt, reference):
    model = swapmoe.load(ckpt, "100%", device="cpu")
    assert torch.equal(_logits(model), _logits(reference))
    with torch.inference_mode():  # decode: one term per expert, the per-term scratch
        a = model.generate(IDS[:, :6], max_new_tokens=16, do_sample=False)
        b = reference.generate(IDS[:, :6], max_new_tokens=16, do_sample=False)
    assert torch.equal(a, b)
    fwd = model.swapmoe.layers[0].layer.experts.forward
    assert fwd.layout.fmt == "mxfp4" and fwd.parts["gate_up_proj.blocks"].dtype == torch.uint8
    _slots_hold_the_files_parts(model, ckpt)


def test_budget_counts_the_true_bytes_and_no_decoded_copy_is_kept(ckpt):
    model = swapmoe.load(ckpt, "20%", device="cpu")  # of the bf16 experts: MXFP4 holds 3.5x as many
    _logits(model)
    stats = model.swapmoe.stats()["total"]
    layouts = [st.layer.experts.forward.layout for st in model.swapmoe.layers]
    planned = sum(st.num_slots * lay.expert_bytes() for st, lay in zip(model.swapmoe.layers, layouts, strict=True))
    walked = experts_storages(model).bytes
    assert walked == stats["resident_bytes"] == planned <= stats["budget_bytes"]
    assert held_storages(model).bytes - walked <= bookkeeping_allowance(model)
    assert 8 < stats["slots"] < 16  # bf16 experts would not even hold top-k (2 per layer) at 20%
    assert {la["expert_store"] for la in model.swapmoe.stats()["layers"]} == {"host"}
    store = model.swapmoe.layers[0].pool.store
    assert store.expert_bytes() == layouts[0].expert_bytes()
    assert store.tensors["down_proj.blocks"].dtype == torch.uint8  # the host store holds MXFP4 too


@pytest.mark.parametrize("host_budget", [None, 1])
def test_swaps_under_a_budget_equal_the_same_experts_decoded_to_bf16(ckpt, host_budget):
    """Held as MXFP4 (host store, or the files with a 1-byte host budget) or converted to bf16 at load,
    the same slots give the same tokens, swap for swap: the parts a swap copies are the expert's."""
    kw = {"slots": [3, 3], "device": "cpu", "update_interval": 1, "swaps_per_update": 2}
    ours = swapmoe.load(ckpt, host_budget=host_budget, **kw)
    bf16 = swapmoe.load(ckpt, expert_dtype="bf16", **kw)
    assert bf16.swapmoe.layers[0].pool.slots["gate_up_proj"].dtype == torch.bfloat16  # converted from MXFP4
    want = "checkpoint" if host_budget else "host"
    assert {la["expert_store"] for la in ours.swapmoe.stats()["layers"]} == {want}
    assert torch.equal(_logits(ours), _logits(bf16))
    with torch.inference_mode():
        a = ours.generate(IDS[:, :8], max_new_tokens=16, do_sample=False)
        b = bf16.generate(IDS[:, :8], max_new_tokens=16, do_sample=False)
    assert torch.equal(a, b)
    assert ours.swapmoe.stats()["total"]["swaps"] == bf16.swapmoe.stats()["total"]["swaps"] > 0
    _slots_hold_the_files_parts(ours, ckpt)


def test_transformers_decoded_matrices_are_streamed_past_host_memory(ckpt):
    """Held as MXFP4, a layer needs only the norms of what transformers decodes: with no host budget too."""
    from swapmoe.checkpoint import check_checkpoint
    from swapmoe.loader import _expert_streamer
    from swapmoe.mmap_store import weight_files

    c = check_checkpoint(ckpt)
    streamer = _expert_streamer(c, None, None, [3, 3], torch.bfloat16, False, weight_files(c.weight_files))
    mx = streamer.mxfp4
    assert set(mx) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    with streamer:
        AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=Mxfp4Config(dequantize=True))
    assert {n: set(p) for n, p in streamer.streamed.items()} == dict.fromkeys(mx, {"gate_up_proj", "down_proj"})


@pytest.mark.parametrize("host_budget", [None, 1])
def test_int8_converts_from_mxfp4_at_load(ckpt, reference, host_budget):
    model = swapmoe.load(ckpt, "100%" if host_budget is None else None, slots=None if host_budget is None
                         else [4, 4], host_budget=host_budget, expert_dtype="int8", device="cpu")
    layer = model.swapmoe.layers[0]
    parts = layer.pool.slots if layer.pool is not None else layer.layer.experts.forward.parts
    assert parts["gate_up_proj.q"].dtype == torch.int8
    if host_budget is None:
        diff = (_logits(model) - _logits(reference)).abs()
        assert 0 < diff.max() <= INT8_MAX_LOGIT_TOL
    else:  # read from the files, decoded and quantised per expert: what the host store holds
        held = swapmoe.load(ckpt, slots=[4, 4], expert_dtype="int8", device="cpu").swapmoe.layers[0].pool.store
        staged = layer.pool.store.stage(5, pin=False)
        assert type(layer.pool.store).__name__ == "DecodingStore"
        assert set(staged) == set(held.tensors) and all(torch.equal(staged[n], held.tensors[n][5]) for n in staged)


# ------------------------------------------------------------------------------------------- refusals
def _corrupt(tmp_path, edit):
    return make_mxfp4_checkpoint(tmp_path / "bad", edit_parts=edit)


KEY = "model.layers.1.mlp.experts.down_proj"


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.__setitem__(f"{KEY}_blocks", s[f"{KEY}_blocks"][..., :8].contiguous()), "down_proj_blocks is"),
    (lambda s: s.pop(f"{KEY}_scales"), "no model.layers.1.mlp.experts.down_proj_scales"),
    (lambda s: s.__setitem__(f"{KEY}_scales", s[f"{KEY}_scales"].float()), "MXFP4 blocks and scales are uint8"),
    (lambda s: s[f"{KEY}_scales"][5, 0, 0].fill_(255), "NaN scale"),
])
@pytest.mark.parametrize("host_budget", [None, 1])
def test_corrupt_blocks_or_scales_are_refused_in_one_line(tmp_path, edit, message, host_budget):
    path = _corrupt(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as err:
        swapmoe.load(path, "50%", host_budget=host_budget, device="cpu")
    assert "\n" not in str(err.value)


def test_parts_that_do_not_decode_to_the_loaded_weights_are_refused(ckpt, reference):
    from swapmoe.mmap_store import SafetensorsFiles, weight_files

    experts = reference.model.layers[0].mlp.experts
    dense = {n: p.detach() for n, p in experts.named_parameters()}
    layout = mxfp4.Mxfp4Layout.of(dense)
    files = SafetensorsFiles(weight_files([ckpt / "model.safetensors"]))
    keys = mxfp4.part_keys("model.layers.0.mlp.experts")
    assert mxfp4.host_parts("layer 0", layout, keys, files, dense)["gate_up_proj.blocks"].shape == (8, 64, 1, 16)
    swapped = {**dense, "down_proj": dense["down_proj"].flip(0)}  # experts in the wrong order
    with pytest.raises(CheckpointError, match="does not decode to the weights transformers loads"):
        mxfp4.host_parts("layer 0", layout, keys, files, swapped)
    with pytest.raises(CheckpointError, match="does not decode"):
        mxfp4.checkpoint_store("layer 0", layout, keys, files, swapped)
    assert mxfp4.Mxfp4Finder(keys, files).recipe("down_proj", swapped["down_proj"]) is None


def test_a_config_without_mxfp4_is_not_taken_for_one(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    assert mxfp4.checkpoint_is_mxfp4(cfg)
    assert not mxfp4.checkpoint_is_mxfp4({**cfg, "quantization_config": {"quant_method": "fp8"}})
    assert not mxfp4.checkpoint_is_mxfp4({k: v for k, v in cfg.items() if k != "quantization_config"})


def test_info_shows_the_published_format_and_agrees_with_the_load(ckpt):
    from swapmoe.inspect import describe

    info = describe(ckpt)
    assert info.published == "mxfp4"
    assert info.stored_bytes("mxfp4") == [mxfp4.Mxfp4Layout.of(
        {n: getattr(st.layer.experts, n) for n in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")}
    ).expert_bytes() for st in swapmoe.load(ckpt, "100%", device="cpu", expert_dtype="bf16").swapmoe.layers]
    model = swapmoe.load(ckpt, "12.5%", device="cpu")  # below the bf16 minimum (top-k), not MXFP4's
    assert [la["slots"] for la in model.swapmoe.stats()["layers"]] == info.slots_for(0.125, "mxfp4") == [3, 3]


def test_static_split_steps_equal_eager_steps_while_swapping_mxfp4_slots(ckpt):
    """The graph path without the capture (swapmoe.engine.decoder's static mode: scheduler between
    steps, hooks doing in-graph work only, the per-term MXFP4 decode inside the step) routes, swaps and
    decodes exactly as eager forwards do."""
    from swapmoe.engine.decoder import Decoder

    runs = {}
    for mode in ("dynamic", "static"):
        model = swapmoe.load(ckpt, slots=[3, 3], device="cpu", update_interval=2, swaps_per_update=1)
        dec = Decoder(model, mode, min_capacity=16)
        logits = dec.prefill(IDS[0, :8].tolist(), max_new_tokens=30)
        tokens, rows = [], []
        for _ in range(30):
            rows.append(dec.read_logits(logits))
            tokens.append(int(rows[-1].argmax()))
            logits = dec.step(tokens[-1])
        runs[mode] = (tokens, rows, model.swapmoe.stats()["total"], model.swapmoe.resident_sets())
    (t_dyn, r_dyn, s_dyn, sets_dyn), (t_sta, r_sta, s_sta, sets_sta) = runs["dynamic"], runs["static"]
    assert s_dyn["swaps"] > 0
    assert t_sta == t_dyn and sets_sta == sets_dyn
    for a, b in zip(r_sta, r_dyn, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # measured: equal bit for bit
    assert all(s_sta[k] == s_dyn[k] for k in ("swaps", "bytes_copied", "hits", "lookups"))
    # a swap moves the MXFP4 bytes of one expert (blocks, scales, biases), not its bf16 bytes
    assert s_dyn["bytes_copied"] == s_dyn["swaps"] * model.swapmoe.layers[0].layer.experts.forward.layout.expert_bytes()


def test_quantized_all_keeps_an_mxfp4_checkpoint_as_published(ckpt, caplog):
    """MXFP4 as published is exact and smaller than int8 or int4: quantized-all keeps it where it fits,
    and converts it only to a format smaller still."""
    import logging

    from swapmoe.baselines import load_policy, quantized_all_format

    assert quantized_all_format(ckpt, "30%") is None  # all 8 MXFP4 experts fit in 30% of the bf16 bytes
    model = load_policy("quantized-all", ckpt, "30%", device="cpu")
    assert all(la["slots"] == la["num_experts"] for la in model.swapmoe.stats()["layers"])
    assert model.swapmoe.layers[0].layer.experts.forward.layout.fmt == "mxfp4"
    # below MXFP4's bytes only a smaller format can hold them all: int3/int2 (converted from MXFP4)
    assert quantized_all_format(ckpt, "27%") == "int3"  # MXFP4: 28.8%, int3: 25.3% of the bf16 bytes
    with caplog.at_level(logging.WARNING):
        assert quantized_all_format(ckpt, "5%") == "int2"
    assert "even int2 experts" in caplog.text
