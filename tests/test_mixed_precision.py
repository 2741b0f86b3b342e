"""Experts held in a format per MoE layer (``expert_dtype=[...]``, a plan's ``expert_dtype``)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import swapmoe
from swapmoe.budget import allocate_slots
from swapmoe.errors import PlanError, SwapMoEError
from swapmoe.plan import Plan, read_plan
from swapmoe.qexperts import QuantisedForward
from swapmoe.quant import ExpertLayout
from tests.memory import StorageWalk, bookkeeping_allowance, held_storages
from tests.tiny_models import VOCAB, make_checkpoint, save_tokenizer

MIXED = ["int4", "int8", None]  # the tiny model is float32: None keeps float32 experts
Q_DTYPE = {"int4": torch.uint8, "int8": torch.int8, None: torch.float32}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("mixed") / "qwen3-moe", num_hidden_layers=3)
    return save_tokenizer(path)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))


def _layer_bytes(st) -> int:
    walk = StorageWalk()
    walk.walk(st.layer.experts, into_modules=True)
    return walk.bytes


def _format_of(st):
    """The format a layer's slots (or, for a full layer, its parts) hold, read from the tensors."""
    fwd = st.layer.experts.__dict__.get("forward")
    held = st.pool.slots if st.pool is not None else (fwd.parts if isinstance(fwd, QuantisedForward) else {})
    q = held.get("gate_up_proj.q")
    return None if q is None else {torch.uint8: "int4", torch.int8: "int8", torch.bfloat16: "bf16"}[q.dtype]


def _one_expert_bytes(st, fmt) -> int:
    """Bytes of one expert as the layer's slots hold it (its format's weights, scales, zero points)."""
    if fmt is None:
        return sum(st.pool.slots[n][0].numel() * st.pool.slots[n].element_size() for n in st.layer.expert_param_names)
    return st.layer.experts.forward.layout.expert_bytes()


def test_each_layer_holds_its_own_format_within_the_budget(tiny, ids):
    model = swapmoe.load(tiny, "30%", expert_dtype=MIXED)
    with torch.inference_mode():
        model(ids)  # a forward: its scratch must not outlive it
    stats = model.swapmoe.stats()
    walked = 0
    for st, fmt, la in zip(model.swapmoe.layers, MIXED, stats["layers"], strict=True):
        assert _format_of(st) == fmt
        assert st.pool.slots["gate_up_proj.q" if fmt else "gate_up_proj"].dtype == Q_DTYPE[fmt]
        per_expert = _one_expert_bytes(st, fmt)
        assert _layer_bytes(st) == st.pool.num_slots * per_expert == la["resident_bytes"]
        walked += _layer_bytes(st)
    total = stats["total"]
    assert walked == total["resident_bytes"] <= total["budget_bytes"]
    assert held_storages(model).bytes - walked <= bookkeeping_allowance(model)  # no dequantised copy kept
    # the budget is allocated in each layer's own bytes (budget.allocate_slots), and fewer bits hold more
    per_expert = [_one_expert_bytes(st, f) for st, f in zip(model.swapmoe.layers, MIXED, strict=True)]
    assert per_expert[0] < per_expert[1] < per_expert[2]
    slots = [st.pool.num_slots for st in model.swapmoe.layers]
    assert slots == allocate_slots(total["budget_bytes"], per_expert, [8] * 3, [2] * 3)
    assert sum(slots) > swapmoe.load(tiny, "30%").swapmoe.stats()["total"]["slots"]


def test_swaps_keep_maps_and_each_layers_slots_consistent(tiny, ids):
    original = AutoModelForCausalLM.from_pretrained(tiny).eval()
    blocks = [m for m in original.modules() if type(m).__name__.endswith("Experts")]
    plan = Plan(slots=[4, 3, 3], update_interval=1, swaps_per_update=2, expert_dtype=["int8", None, "int4"])
    model = swapmoe.load(tiny, plan=plan)
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=24, do_sample=False)
    assert all(st.swaps > 0 for st in model.swapmoe.layers)
    stats = model.swapmoe.stats()["total"]
    assert stats["resident_bytes"] <= stats["budget_bytes"]
    for st, fmt, src in zip(model.swapmoe.layers, plan.expert_dtype, blocks, strict=True):
        pool = st.pool
        assert _format_of(st) == fmt and pool.num_slots == len(pool.expert_in)
        layout = ExpertLayout.of({n: getattr(src, n) for n in st.layer.expert_param_names}, fmt) if fmt else None
        for s, e in enumerate(pool.expert_in):
            assert e >= 0 and pool.slot_of[e].item() == s and pool.resident[e].item()
            one = {n: getattr(src, n).detach()[e] for n in st.layer.expert_param_names}
            want = layout.encode(one) if layout else one
            for n, t in want.items():
                assert torch.equal(pool.slots[n][s], t), (st.layer.name, s, e, n)
        assert int(pool.resident.sum()) == pool.num_slots


def test_the_same_format_in_every_layer_is_the_uniform_precision(tiny, ids):
    kw = {"update_interval": 2, "swaps_per_update": 1}
    uniform = swapmoe.load(tiny, "20%", expert_dtype="int8", **kw)
    listed = swapmoe.load(tiny, "20%", expert_dtype=["int8"] * 3, **kw)
    assert [st.pool.num_slots for st in listed.swapmoe.layers] == [st.pool.num_slots for st in uniform.swapmoe.layers]
    with torch.inference_mode():
        assert torch.equal(uniform(ids).logits, listed(ids).logits)
        a = uniform.generate(ids[:, :6], max_new_tokens=16, do_sample=False)
        b = listed.generate(ids[:, :6], max_new_tokens=16, do_sample=False)
    assert torch.equal(a, b)
    assert uniform.swapmoe.stats()["total"]["swaps"] == listed.swapmoe.stats()["total"]["swaps"] > 0


def test_plan_expert_dtype_round_trip_and_errors(tmp_path, tiny):
    path = tmp_path / "p.json"
    Plan(slots=[2, 3, 4], expert_dtype=["int4", "bf16", None]).save(path)
    assert read_plan(path).expert_dtype == ["int4", "bf16", None]
    Plan(slots=[2, 3, 4], expert_dtype="int8").save(path)
    assert read_plan(path).expert_dtype == "int8"
    Plan(slots=[2, 3, 4]).save(path)
    assert "expert_dtype" not in json.loads(path.read_text()) and read_plan(path).expert_dtype is None

    def bad(value):
        path.write_text(json.dumps({"slots": [2, 3, 4], "expert_dtype": value}))
        with pytest.raises(PlanError) as e:
            read_plan(path)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg
        return msg

    assert "lists 2 formats for 3 MoE layers" in bad(["int8", "int4"])
    assert "'expert_dtype'[1] is 'fp8'" in bad(["int8", "fp8", "int4"])
    assert "unknown expert dtype 'int1'" in bad("int1")
    Plan(slots=[2, 3, 4], expert_dtype=["int2", "int3", None]).save(path)  # the low-bit formats are formats
    assert read_plan(path).expert_dtype == ["int2", "int3", None]
    assert "non-empty list" in bad([])
    assert "non-empty list" in bad({"layer0": "int8"})
    with pytest.raises(PlanError, match="lists 1 formats for 3 MoE layers"):
        Plan(slots=[2, 3, 4], expert_dtype=["int8"])
    # a Python list of the wrong length, or with an unknown format, fails before loading
    with pytest.raises(SwapMoEError, match="lists 2 formats for 3 MoE layers"):
        swapmoe.load(tiny, "50%", expert_dtype=["int8", "int4"])
    with pytest.raises(SwapMoEError, match=r"expert_dtype\[0\] is 'int1'"):
        swapmoe.load(tiny, "50%", expert_dtype=["int1", "int4", "int8"])


def test_explicit_expert_dtype_overrides_the_plans(tiny):
    plan = Plan(slots=[2, 2, 2], expert_dtype=["int4", "int4", "int4"])
    assert [_format_of(st) for st in swapmoe.load(tiny, plan=plan).swapmoe.layers] == ["int4"] * 3
    model = swapmoe.load(tiny, plan=plan, expert_dtype="int8")
    assert [_format_of(st) for st in model.swapmoe.layers] == ["int8"] * 3


def test_cli_runs_a_plan_with_per_layer_precision(tmp_path, tiny, capsys):
    from swapmoe.cli import main

    plan = tmp_path / "plan.json"
    Plan(slots=[3, 2, 8], update_interval=2, expert_dtype=["int8", None, "int4"]).save(plan)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 40}" for i in range(120)))
    assert main(["generate", str(tiny), "--plan", str(plan), "--prompt", "w1 w2 w3", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny), "--plan", str(plan), "--text", str(text), "--window", "32",
                 "--decode-tokens", "0", "--no-reference", "--device", "cpu", "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    want = swapmoe.load(tiny, plan=read_plan(plan)).swapmoe.stats()["total"]["resident_bytes"]
    assert row["perplexity"] > 1 and row["expert_bytes"] == want  # the plan's formats, layer by layer
    assert want != swapmoe.load(tiny, slots=[3, 2, 8]).swapmoe.stats()["total"]["resident_bytes"]
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"slots": [3, 2, 8], "expert_dtype": ["int8", "int4"]}))
    assert main(["generate", str(tiny), "--plan", str(bad), "--prompt", "w1", "--device", "cpu"]) == 2
    assert "lists 2 formats for 3 MoE layers" in capsys.readouterr().err


def test_eval_sweep_and_trace_take_expert_dtype(tmp_path, tiny, capsys):
    from swapmoe.cli import main

    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 40}" for i in range(100)))
    common = ["--text", str(text), "--window", "32", "--decode-tokens", "0", "--device", "cpu"]
    assert main(["sweep", str(tiny), *common, "--no-reference", "--no-warmup", "--expert-dtype", "int8",
                 "--policies", "swapmoe,swapmoe-int4,magnitude-keep", "--budgets", "25%",
                 "--out", str(tmp_path / "s")]) == 0
    data = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert data["meta"]["expert_dtype"] == "int8" and len(data["cells"]) == 3
    cells = {c["policy"]: c for c in data["cells"].values()}
    int8 = swapmoe.load(tiny, "25%", expert_dtype="int8").swapmoe.stats()["total"]["resident_bytes"]
    int4 = swapmoe.load(tiny, "25%", expert_dtype="int4").swapmoe.stats()["total"]["resident_bytes"]
    assert cells["swapmoe"]["expert_bytes"] == cells["magnitude-keep"]["expert_bytes"] == int8
    assert cells["swapmoe-int4"]["expert_bytes"] == int4 != int8  # its precision is in its name: kept
    assert main(["trace", str(tiny), "--text", str(text), "--out", str(tmp_path / "tr"), "--heat-window", "8",
                 "--expert-dtype", "int4"]) == 0


def test_checkpoint_backed_layers_hold_their_own_format(tiny, ids):
    """--host-budget: the layers left in the files read and quantise each expert in their own format."""
    kw = {"update_interval": 1, "swaps_per_update": 2, "expert_dtype": ["int8", "int4", None]}
    held = swapmoe.load(tiny, "25%", **kw)
    mapped = swapmoe.load(tiny, "25%", host_budget=1, **kw)  # 1 byte: every layer stays in the files
    assert {la["expert_store"] for la in mapped.swapmoe.stats()["layers"]} == {"checkpoint"}
    with torch.inference_mode():
        a = held.generate(ids[:, :8], max_new_tokens=12, do_sample=False)
        b = mapped.generate(ids[:, :8], max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b)
    assert mapped.swapmoe.stats()["total"]["swaps"] == held.swapmoe.stats()["total"]["swaps"] > 0
    for x, y, fmt in zip(held.swapmoe.layers, mapped.swapmoe.layers, kw["expert_dtype"], strict=True):
        assert _format_of(y) == fmt and y.pool.store.expert_bytes() == x.pool.store.expert_bytes()


def test_ondemand_with_per_layer_formats_is_exact(tiny, ids):
    """`ondemand` loads every missing expert: it computes what the full model in the same formats does."""
    from swapmoe.baselines import load_policy

    full = swapmoe.load(tiny, "100%", expert_dtype=MIXED)
    od = load_policy("ondemand", tiny, "25%", expert_dtype=MIXED)
    assert [_format_of(st) for st in od.swapmoe.layers] == MIXED
    with torch.inference_mode():
        torch.testing.assert_close(od(ids).logits, full(ids).logits, rtol=1e-5, atol=1e-5)
        a = full.generate(ids[:, :4], max_new_tokens=10, do_sample=False)
        b = od.generate(ids[:, :4], max_new_tokens=10, do_sample=False)
    assert torch.equal(a, b) and od.swapmoe.stats()["total"]["swaps"] > 0
