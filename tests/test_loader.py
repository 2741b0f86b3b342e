"""The family matrix: tiny random checkpoints of every tested family, saved and loaded back.

For each family this shows (issue 2, "How it is shown"):
  (a) at a 100% budget, logits and greedy tokens are bit-identical to plain transformers;
  (b) the expert bytes resident on the device, summed from the tensors, never exceed the budget,
      also while experts are being swapped during generation;
  (c) under the mask only resident experts are computed: the experts kernel sees slot ids of
      resident experts (or the sentinel, weight 0), and its output equals a reference computed from
      the original weights of exactly those experts;
  (d) with a skewed workload the resident set moves to the experts the router prefers;
  (e) exchange and skip differ from the full model only on tokens whose unmasked top-k choices were
      not all resident (layer level: the same hidden states through both MoE blocks).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import swapmoe
from swapmoe.errors import UnsupportedModelError
from swapmoe.families import find_moe_layers, supported_families
from swapmoe.inspect import describe
from swapmoe.routing import unpack_router_output
from tests.adapters.tiny import ADAPTED
from tests.counting import recount_hits
from tests.matrix import block_out, call_router, distinct_weight_bytes, greedy, prompt
from tests.memory import bookkeeping_allowance, experts_storages, held_storages, slot_addresses
from tests.threads import single_torch_thread
from tests.tiny_models import (
    FAMILIES,
    available,
    build_model,
    layouts,
    make_checkpoint,
    make_dense_checkpoint,
)

F32 = torch.float32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (and far faster than several on a busy 2-core machine)."""
    with single_torch_thread():
        yield


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(family, layout="fused", sharded=False, variant="plain")`` -> a saved tiny checkpoint.

    Built once per session; ``variant="skewed"`` is the checkpoint of :func:`_skew`.
    """
    cache: dict[tuple, object] = {}

    def get(family: str, layout: str = "fused", sharded: bool = False, variant: str = "plain"):
        key = (family, layout, sharded, variant)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{family}-{layout}-{'sharded' if sharded else 'single'}-{variant}")
            edit = _skew if variant == "skewed" else None
            cache[key] = make_checkpoint(family, path, layout=layout, sharded=sharded, edit=edit)
        return cache[key]

    return get


def _plain(path, dtype=F32, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()


def _expert_tensors(model) -> list[list[torch.Tensor]]:
    """The per-expert parameters each MoE layer's experts module computes with right now."""
    return [[getattr(st.layer.experts, n) for n in st.layer.expert_param_names] for st in model.swapmoe.layers]


# --------------------------------------------------------------------------- (a) exactness at 100%
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize(("family", "layout"), [(f, lo) for f in FAMILIES for lo in layouts(f)])
def test_full_budget_is_bit_identical_to_transformers(checkpoint, family, layout, sharded):
    from safetensors import safe_open

    path = checkpoint(family, layout, sharded)
    names = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            names.update(st.keys())
    assert (path / "model.safetensors.index.json").is_file() == sharded
    # the layout on disk is the one named: published per-expert names (GraniteMoE: its 3D
    # input_linear/output_linear), or transformers 5.x fused names
    assert any(".experts.0." in n or ".input_linear." in n for n in names) == (layout == "legacy")
    assert any(n.endswith("experts.gate_up_proj") for n in names) == (layout == "fused")

    ref = _plain(path)
    model = swapmoe.load(path, "100%", device="cpu", dtype=F32)
    assert model.swapmoe.stats()["total"]["slots"] == sum(la.num_experts for la in find_moe_layers(ref))
    ids = prompt()
    with torch.no_grad(), recount_hits(model) as counted:
        assert torch.equal(model(ids).logits, ref(ids).logits)
        assert torch.equal(greedy(model, ids), greedy(ref, ids))
    total = model.swapmoe.stats()["total"]
    # every router call was counted (a hit rate of 1.0 at 100% is true by construction; the count is not)
    assert counted["lookups"] > 0 and (total["hits"], total["lookups"]) == (counted["hits"], counted["lookups"])


@pytest.mark.parametrize("family", [f for f in FAMILIES if "legacy" not in layouts(f)])
def test_fused_only_families_have_no_per_expert_layout(tmp_path, family):
    """Why such a family is tested in the fused layout only: transformers itself saves fused names."""
    from safetensors import safe_open

    build_model(family).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as st:
        names = set(st.keys())
    assert not any(".experts.0." in n for n in names)
    assert any(n.endswith("experts.gate_up_proj") for n in names)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_is_bit_identical_in_bfloat16(checkpoint, family):
    path = checkpoint(family)
    ref = _plain(path, torch.bfloat16)
    model = swapmoe.load(path, "100%", device="cpu", dtype="bfloat16")
    ids = prompt(seed=1)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert torch.equal(greedy(model, ids), greedy(ref, ids))


# ------------------------------------------------------------------ (b) budget while swapping
@pytest.mark.parametrize("strategy", ["exchange", "skip"])
@pytest.mark.parametrize("family", FAMILIES)
def test_memory_held_never_exceeds_budget_while_swapping(checkpoint, family, strategy):
    """Measured from the storages the experts modules and the runtime hold (tests/memory.py), before
    every experts call (after that step's swaps) and after the run, not from the pool's declared size."""
    path = checkpoint(family)
    info = describe(path)
    budget = int(0.6 * info.total_expert_bytes)  # not a whole number of experts per layer
    model = swapmoe.load(path, str(budget), device="cpu", dtype=F32, strategy=strategy,
                         update_interval=1, swaps_per_update=2, initial="random")
    ve = model.swapmoe
    allowance = bookkeeping_allowance(model)
    addresses = slot_addresses(model)
    experts_seen: list[int] = []
    held_seen: list[int] = []

    def measure(*_):
        experts_seen.append(experts_storages(model).bytes)
        held_seen.append(held_storages(model).bytes)

    handles = [st.layer.experts.register_forward_pre_hook(measure) for st in ve.layers]
    greedy(model, prompt(), new=12)
    for h in handles:
        h.remove()

    stats = ve.stats()["total"]
    assert stats["swaps"] > 0, "the workload must make experts move for this test to mean anything"
    assert stats["budget_bytes"] == budget
    assert experts_seen and max(experts_seen) <= budget  # what the kernels compute from, whole storages
    assert max(held_seen) <= budget + allowance  # and nothing else the runtime keeps (maps, scores, counters)
    assert held_storages(model).bytes <= budget + allowance
    # swaps copy into the slots allocated at load: no slot tensor was replaced by a new allocation
    assert slot_addresses(model) == addresses
    for st, tensors in zip(ve.layers, _expert_tensors(model), strict=True):
        assert st.pool is not None and st.pool.num_slots < st.layer.num_experts
        assert all(t.shape[0] == st.pool.num_slots for t in tensors)
        assert len(set(st.pool.expert_in)) == st.pool.num_slots and min(st.pool.expert_in) >= 0
    # and no other tensor of the model holds expert weights: parameters + buffers = non-expert + slots
    assert distinct_weight_bytes(model) == info.other_bytes + experts_storages(model).bytes


# ------------------------------------------------------ (c) only resident experts are computed
def _swiglu_expert(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` on one token in float64, the common layout: ``gate_up_proj [E, 2I, H]`` split in
    halves, ``act(gate) * up``, then ``down_proj [E, H, I]``; no biases."""
    gate, up = F.linear(x, experts.gate_up_proj[e].double()).chunk(2, dim=-1)  # [I], [I]
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[e].double())  # [H]


def _gpt_oss_expert(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of gpt-oss in float64: ``gate_up_proj [E, H, 2I]`` (transposed) with gate and up
    *interleaved* in its columns, biases ``[E, 2I]`` and ``[E, H]``, gate clamped from above and up
    on both sides at ``limit``, and ``(up + 1) * gate * sigmoid(alpha * gate)``."""
    gate_up = x @ experts.gate_up_proj[e].double() + experts.gate_up_proj_bias[e].double()  # [2I]
    gate = gate_up[0::2].clamp(max=experts.limit)  # [I]
    up = gate_up[1::2].clamp(min=-experts.limit, max=experts.limit)  # [I]
    glu = gate * torch.sigmoid(gate * experts.alpha)  # [I]
    return ((up + 1) * glu) @ experts.down_proj[e].double() + experts.down_proj_bias[e].double()  # [H]


# family -> float64 reference of one expert, written from the family's definition (default: SwiGLU)
_REFERENCE_EXPERT = {"gpt_oss": _gpt_oss_expert}


def _reference_terms(family, experts_full, hidden, slot_ids, weights, expert_in, num_slots) -> torch.Tensor:
    """Sum over a token's terms of weight * expert(x), computed in float64 from the *original*
    weights of the logical expert in each slot; sentinel and weight-0 terms contribute nothing."""
    expert = _REFERENCE_EXPERT.get(family, _swiglu_expert)
    out = torch.zeros(hidden.shape, dtype=torch.float64)  # [T, H]
    for t in range(hidden.shape[0]):
        for k in range(slot_ids.shape[1]):
            s, w = int(slot_ids[t, k]), float(weights[t, k])
            if s == num_slots or w == 0.0:
                continue
            out[t] += w * expert(experts_full, expert_in[s], hidden[t].double())
    return out


def _spy_on_experts(model, full_experts, calls: list[tuple]) -> None:
    """Record every call of each virtualised experts module, checking first that its slots hold the
    original weights (biases included) of the experts mapped there."""

    def spy(st, full):
        def hook(module, args, output):
            hidden, slot_ids, weights = args[:3]
            pool = st.pool
            assert module.num_experts == pool.num_slots == module.gate_up_proj.shape[0]
            for s, e in enumerate(pool.expert_in):
                for n in st.layer.expert_param_names:
                    assert torch.equal(pool.slots[n][s], getattr(full, n)[e])
            calls.append((st, full, hidden.clone(), slot_ids.clone(), weights.clone(),
                          list(pool.expert_in), output.clone()))

        return hook

    for st, full in zip(model.swapmoe.layers, full_experts, strict=True):
        st.layer.experts.register_forward_hook(spy(st, full))


@pytest.mark.parametrize("strategy", ["exchange", "skip"])
@pytest.mark.parametrize("family", FAMILIES)
def test_only_resident_experts_are_computed(checkpoint, family, strategy):
    path = checkpoint(family)
    full_experts = [la.experts for la in find_moe_layers(_plain(path))]
    model = swapmoe.load(path, "50%", device="cpu", dtype=F32, strategy=strategy,
                         update_interval=2, swaps_per_update=1, initial="first")
    calls: list[tuple] = []
    _spy_on_experts(model, full_experts, calls)
    greedy(model, prompt(), new=6)
    assert model.swapmoe.stats()["total"]["swaps"] > 0
    assert model.swapmoe.stats()["total"]["hit_rate"] < 1.0

    sentinels = 0
    for st, full, hidden, slot_ids, weights, expert_in, output in calls:
        num_slots = st.pool.num_slots
        assert ((slot_ids >= 0) & (slot_ids <= num_slots)).all()  # slots of the layer, or the sentinel
        on_sentinel = slot_ids == num_slots
        assert torch.all(weights[on_sentinel] == 0)
        sentinels += int(on_sentinel.sum())
        if strategy == "exchange":  # every token still gets K resident experts, so no sentinel at all
            assert not on_sentinel.any()
        ref = _reference_terms(family, full, hidden, slot_ids, weights, expert_in, num_slots)
        torch.testing.assert_close(output.double(), ref, rtol=1e-5, atol=1e-6)
    if strategy == "skip":
        assert sentinels > 0  # some terms were skipped, and they computed nothing


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_experts_kernel_handles_skipped_terms(checkpoint, family, impl):
    """Skip sends missing terms to the sentinel; every transformers kernel must compute nothing for it.

    Each experts call is checked against the float64 reference of its terms without the skipped ones
    (a kernel that cannot skip gets a resident slot with weight 0: with biases, the term must still
    add exactly nothing), and the logits against the grouped_mm kernel.
    """
    path = checkpoint(family)
    full_experts = [la.experts for la in find_moe_layers(_plain(path))]
    ref_model = swapmoe.load(path, "50%", device="cpu", dtype=F32, strategy="skip", swaps_per_update=0,
                             experts_implementation="grouped_mm")
    model = swapmoe.load(path, "50%", device="cpu", dtype=F32, strategy="skip", swaps_per_update=0,
                         experts_implementation=impl)
    assert {st.layer.experts.config._experts_implementation for st in model.swapmoe.layers} == {impl}
    calls: list[tuple] = []
    _spy_on_experts(model, full_experts, calls)
    ids = prompt(seed=2)
    with torch.no_grad():
        out, ref = model(ids).logits, ref_model(ids).logits
    assert model.swapmoe.stats()["total"]["hit_rate"] < 1.0
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    skipped = 0
    for st, full, hidden, slot_ids, weights, expert_in, output in calls:
        skipped += int((weights == 0).sum())
        ref_terms = _reference_terms(family, full, hidden, slot_ids, weights, expert_in, st.pool.num_slots)
        torch.testing.assert_close(output.double(), ref_terms, rtol=1e-5, atol=1e-6)
    assert skipped > 0


# ---------------------------------------------------- (d) the resident set follows the router
PREFERRED = (5, 6)  # outside the initial resident set {0, 1, 2, 3} ("first", 4 of 8 slots)
_D = 0  # the hidden dimension that carries the skew


def _skew(model) -> None:
    """Make every router strongly prefer experts PREFERRED, for every token.

    Every token embedding gets a large constant in dimension ``_D``, so after RMSNorm every hidden
    state entering a router is dominated by ``+e_D``; the routers then read dimension ``_D`` as a
    large positive logit for the preferred experts and a large negative one for the others.
    """
    model.get_input_embeddings().weight[:, _D] = 8.0
    for la in find_moe_layers(model):
        w = la.router_weight
        w[:, _D] = -4.0
        w[list(PREFERRED), _D] = 4.0


@pytest.mark.parametrize("family", FAMILIES)
def test_resident_set_moves_to_the_experts_the_router_prefers(checkpoint, family):
    path = checkpoint(family, variant="skewed")
    # the router really prefers PREFERRED in every MoE layer (checked on plain transformers)
    ref = _plain(path)
    chosen: list[torch.Tensor] = []
    hooks = [la.router.register_forward_hook(
        lambda m, a, out, la=la: chosen.append(unpack_router_output(out, la.num_experts)[2]))
        for la in find_moe_layers(ref)]
    with torch.no_grad():
        ref(prompt())
    for h in hooks:
        h.remove()
    assert all(set(c.unique().tolist()) == set(PREFERRED) for c in chosen)

    model = swapmoe.load(path, "50%", device="cpu", dtype=F32, initial="first",
                         update_interval=1, swaps_per_update=1)
    assert all(set(s) == {0, 1, 2, 3} for s in model.swapmoe.resident_sets())
    greedy(model, prompt(), new=4)
    assert all(set(PREFERRED) <= set(s) for s in model.swapmoe.resident_sets())
    assert model.swapmoe.stats()["total"]["swaps"] >= len(PREFERRED) * len(model.swapmoe.layers)
    # once there, every choice of the router is resident
    model.swapmoe.reset_stats()
    greedy(model, prompt(seed=3), new=4)
    assert model.swapmoe.stats()["total"]["hit_rate"] == 1.0


# ------------------------------------- (e) exchange and skip change only the tokens they must
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_rule_with_nothing_masked_is_the_router(checkpoint, family, dtype):
    """The exchange rule of each family, given an all-resident mask, returns what its router returns."""
    path = checkpoint(family)
    model = swapmoe.load(path, "50%", device="cpu", dtype=dtype, swaps_per_update=0)
    gen = torch.Generator().manual_seed(5)
    for st in model.swapmoe.layers:
        st.handle.remove()  # the plain router, without Masked Gating
        assert st.rule is not None, f"{family} has a routing rule of its own"
        x = torch.randn(64, model.config.hidden_size, generator=gen).to(dtype)
        with torch.no_grad():
            logits, weights, indices, _ = unpack_router_output(call_router(st.layer, x), st.layer.num_experts)
        everyone = torch.ones(st.layer.num_experts, dtype=torch.bool)
        w, idx = st.rule(logits, everyone, st.params)
        assert torch.equal(idx, indices)
        assert torch.equal(w, weights)


@pytest.mark.parametrize("strategy", ["exchange", "skip"])
@pytest.mark.parametrize("family", FAMILIES)
def test_masking_changes_only_tokens_with_non_resident_choices(checkpoint, family, strategy):
    """The same hidden states through the full and the virtualised MoE block, one token at a time.

    One token at a time, every expert multiplies one row in both blocks, and the full model's expert
    tensors are copied to fresh (aligned) memory like the slots: CPU matmul kernels round differently
    (~1e-10) for weights at addresses that are not 16-byte aligned, which is where a memory-mapped
    safetensors file may put them. With that, results compare bit for bit.
    """
    path = checkpoint(family)
    ref_layers = find_moe_layers(_plain(path))
    for la in ref_layers:
        for n in la.expert_param_names:
            getattr(la.experts, n).data = getattr(la.experts, n).data.clone()
    model = swapmoe.load(path, "50%", device="cpu", dtype=F32, strategy=strategy, swaps_per_update=0)
    hidden_size = model.config.hidden_size
    gen = torch.Generator().manual_seed(4)
    for st, la in zip(model.swapmoe.layers, ref_layers, strict=True):
        x = torch.randn(48, hidden_size, generator=gen)  # [T, H]
        with torch.no_grad():
            _, _, unmasked, _ = unpack_router_output(call_router(la, x), la.num_experts)  # [T, K]
            full = torch.cat([block_out(la.block, t) for t in x])  # [T, H]
            masked = torch.cat([block_out(st.layer.block, t) for t in x])
        hit = st.pool.resident[unmasked].all(dim=-1)  # [T]: all of the token's top-k choices resident
        assert 0 < int(hit.sum()) < hit.numel(), "need tokens of both kinds"
        assert torch.equal(masked[hit], full[hit])
        assert (masked != full).any(dim=-1)[~hit].all()


# --------------------------------------------------------------- explicit slots, run-time controls
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_explicit_slots_and_runtime_controls(checkpoint, family):
    from swapmoe.errors import PlanError

    path = checkpoint(family)
    model = swapmoe.load(path, slots=[2, 8], device="cpu", dtype=F32, strategy="exchange", swaps_per_update=0)
    ve = model.swapmoe
    assert [st.num_slots for st in ve.layers] == [2, 8]
    assert ve.layers[1].pool is None  # a full layer is not virtualised at all
    assert ve.stats()["total"]["resident_bytes"] == ve.budget_bytes == 10 * ve.layers[0].layer.expert_bytes()
    ids = prompt(seed=6)
    skip_model = swapmoe.load(path, slots=[2, 8], device="cpu", dtype=F32, strategy="skip", swaps_per_update=0)
    with torch.no_grad():
        exchanged = model(ids).logits
        ve.set_strategy("skip")  # switching at run time is the same as loading with it
        assert torch.equal(model(ids).logits, skip_model(ids).logits)
        assert not torch.equal(exchanged, skip_model(ids).logits)
    before = ve.resident_sets()
    greedy(model, ids, new=4)
    assert ve.resident_sets() == before and ve.stats()["total"]["swaps"] == 0  # swaps_per_update=0
    ve.set_updates(update_interval=1, swaps_per_update=1)
    greedy(model, ids, new=4)
    assert ve.stats()["total"]["swaps"] > 0
    with pytest.raises(PlanError, match="top-k=2"):
        swapmoe.load(path, slots=[1, 8], device="cpu")
    with pytest.raises(PlanError, match="slots for 3 MoE layers"):
        swapmoe.load(path, slots=[2, 2, 2], device="cpu")


# ---------------------------------------------------------------------------- unsupported model
@pytest.mark.parametrize("family", FAMILIES)
def test_truncated_or_mismatched_checkpoint_is_rejected_clearly(checkpoint, family, tmp_path):
    """A damaged shard is named before any loading; weights of another shape are refused by the load."""
    import json
    import shutil

    from swapmoe.errors import CheckpointError

    bad = tmp_path / "truncated"
    shutil.copytree(checkpoint(family, layouts(family)[0], sharded=True), bad)
    shard = sorted(bad.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=shard.name):
        swapmoe.load(bad, "50%", device="cpu")
    other = tmp_path / "mismatched"  # a config that does not match the weights (hidden size)
    shutil.copytree(checkpoint(family, layouts(family)[0]), other)
    config = json.loads((other / "config.json").read_text())
    config["hidden_size"] = 48
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="could not load"):
        swapmoe.load(other, "50%", device="cpu")


def test_dense_model_is_unsupported_and_the_error_lists_the_families(tmp_path):
    path = make_dense_checkpoint(tmp_path / "llama")
    with pytest.raises(UnsupportedModelError) as err:
        swapmoe.load(path, "50%", device="cpu")
    message = str(err.value)
    assert "'llama'" in message
    assert all(f in message for f in supported_families())
    # every family swapmoe names as supported is tested: here, or through its adapter (tests/adapters),
    # where "llama4" is the multimodal checkpoint whose text model is loaded
    assert set(FAMILIES) | set(ADAPTED) | {"llama4"} == {f for f in supported_families() if available(f)}
    with pytest.raises(UnsupportedModelError):
        describe(path)


def test_a_load_says_where_its_time_went(checkpoint):
    """``model.swapmoe.load_seconds``: reading the checkpoint, the experts' host side, the device; their sum
    is the load's own time (what a benchmark reports when loads eat a GPU session)."""
    import time

    t0 = time.perf_counter()
    model = swapmoe.load(checkpoint("olmoe"), "50%", device="cpu")
    wall = time.perf_counter() - t0
    phases = model.swapmoe.load_seconds
    assert list(phases) == ["read", "experts", "device"]
    assert all(v >= 0 for v in phases.values()) and 0 < sum(phases.values()) <= wall
    assert phases["read"] > 0  # transformers read the files
