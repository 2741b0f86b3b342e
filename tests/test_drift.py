"""Drift canaries: one small test per transformers internal that swapmoe leans on.

transformers changes fast (5.17 on the GPU machine, 5.24 on PyPI today) and some of what swapmoe uses
is not public API. Each test here checks one such internal directly, so that when a release moves it
the failure names the internal and what swapmoe needs from it, instead of a wrong number surfacing
three layers away in a family-matrix test.
"""

from __future__ import annotations

import threading

import pytest
import torch

from swapmoe.compat import cache_kwargs
from swapmoe.families import find_moe_layers
from swapmoe.routing import unpack_router_output
from tests.matrix import call_router
from tests.threads import single_torch_thread
from tests.tiny_models import FAMILIES, build_model, make_checkpoint


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_torch_thread():
        yield


def _experts(family: str = "mixtral", impl: str = "grouped_mm"):
    """The first MoE layer of a tiny model, with its experts kernel set to ``impl``."""
    model = build_model(family, experts_implementation=impl)
    la = find_moe_layers(model)[0]
    assert la.experts.config._experts_implementation == impl, (
        "config._experts_implementation: swapmoe.load(experts_implementation=...) sets the experts kernel "
        f"through it; a model built with {impl!r} reports {la.experts.config._experts_implementation!r}")
    return model, la


def _compact(la, keep: list[int]) -> None:
    """What the loader does to a virtualised layer: slot tensors ``[S, ...]`` and ``num_experts = S``."""
    for n in la.expert_param_names:
        la.experts._parameters[n] = torch.nn.Parameter(getattr(la.experts, n)[keep].clone(), requires_grad=False)
    la.experts.num_experts = len(keep)
    la.experts._is_expert_parallel = True


# ------------------------------------------------------------------------------ loading internals
def test_set_param_for_module_sees_every_loaded_parameter(tmp_path):
    import transformers.core_model_loading as loading
    from transformers import AutoModelForCausalLM

    need = ("transformers.core_model_loading.set_param_for_module: swapmoe's ExpertStreamer replaces this "
            "module attribute during from_pretrained to see each parameter (full name, loaded tensor) and "
            "hand back a meta tensor for experts it streams")
    assert callable(getattr(loading, "set_param_for_module", None)), f"{need}; it is gone"
    path = make_checkpoint("mixtral", tmp_path / "ckpt", layout="fused")
    original, seen = loading.set_param_for_module, {}

    def spy(model, target_name, param_value, *args, **kwargs):
        seen[target_name] = param_value
        return original(model, target_name, param_value, *args, **kwargs)

    loading.set_param_for_module = spy
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    finally:
        loading.set_param_for_module = original
    names = {n for n, _ in model.named_parameters()}
    assert names <= set(seen), f"{need}; it was not called for {sorted(names - set(seen))[:3]}"
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    assert isinstance(seen.get(fused), torch.Tensor) and seen[fused].dim() == 3, (
        f"{need}; the fused expert tensor {fused} did not arrive as one [E, 2I, H] tensor")


def test_async_load_switch_keeps_loading_on_one_thread(tmp_path, monkeypatch):
    import transformers.core_model_loading as loading
    from transformers import AutoModelForCausalLM

    need = ("HF_DEACTIVATE_ASYNC_LOAD: swapmoe sets it while streaming so that transformers reads checkpoint "
            "tensors one at a time on the loading thread (no worker threads reading ahead), which is what "
            "bounds the host peak under a host budget")
    path = make_checkpoint("mixtral", tmp_path / "ckpt", layout="fused")
    original = loading.set_param_for_module

    def workers_during_load() -> int:
        """Most threads alive during the load that were not alive before it."""
        most = [0]
        before = set(threading.enumerate())

        def spy(*args, **kwargs):
            most[0] = max(most[0], len(set(threading.enumerate()) - before))
            return original(*args, **kwargs)

        loading.set_param_for_module = spy
        try:
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        finally:
            loading.set_param_for_module = original
        return most[0]

    monkeypatch.delenv("HF_DEACTIVATE_ASYNC_LOAD", raising=False)
    threaded = workers_during_load()
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")
    serial = workers_during_load()
    assert threaded > 0, f"{need}; transformers no longer loads on worker threads at all (the switch may be moot)"
    assert serial == 0, f"{need}; with it set, {serial} worker threads still ran during the load"


# ------------------------------------------------------------------------------ experts kernels
@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_kernels_skip_ids_past_num_experts_in_expert_parallel_mode(impl):
    need = ("experts._is_expert_parallel: swapmoe sets it on every virtualised experts module so that the "
            f"{impl} kernel accepts an expert id >= num_experts (the sentinel of a skipped term, weight 0) and "
            "adds exactly nothing for it")
    _, la = _experts(impl=impl)
    _compact(la, [0, 1, 2, 3])
    x = torch.randn(5, la.experts.gate_up_proj.shape[-1], generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 4]] * 5)  # 4 == S: the sentinel, with weight 0 as swapmoe sends it
    w = torch.tensor([[0.5, 0.0]] * 5)  # (5.17's batched_mm clamps the id and relies on that 0)
    with torch.no_grad():
        try:
            out = la.experts(x, ids, w)
        except (IndexError, RuntimeError) as e:
            pytest.fail(f"{need}; the sentinel id failed: {e}")
        ref = la.experts(x, ids[:, :1], w[:, :1])
    assert torch.equal(out, ref), f"{need}; the sentinel term changed the output"


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_kernels_read_num_experts_and_the_weights_tensors_as_set(impl):
    need = ("experts.num_experts: swapmoe overwrites it with the number of slots S and replaces the fused "
            f"[E, ...] parameters by [S, ...] slot tensors; the {impl} kernel must then index the slot tensors "
            "by slot id")
    model, la = _experts(impl=impl)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, la.experts.gate_up_proj.shape[-1], generator=gen)
    logical = torch.tensor([[5, 2], [2, 7], [7, 5], [5, 2], [2, 7], [7, 5]])
    w = torch.rand(6, 2, generator=gen)
    with torch.no_grad():
        full = la.experts(x, logical, w)
        keep = [2, 5, 7]
        _compact(la, keep)
        slot_ids = torch.tensor([[keep.index(int(e)) for e in row] for row in logical])
        compact = la.experts(x, slot_ids, w)
    torch.testing.assert_close(compact, full, rtol=1e-6, atol=1e-6, msg=lambda m: f"{need}; {m}")


def test_experts_dispatch_through_the_registry_by_config_name():
    from transformers.integrations import moe

    need = ("transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS: experts modules pick their kernel by "
            "config._experts_implementation from this registry at each call (swapmoe passes grouped_mm, "
            "batched_mm or eager, and chooses the sentinel by that name)")
    registry = getattr(moe, "ALL_EXPERTS_FUNCTIONS", None)
    assert registry is not None, f"{need}; the registry is gone"
    for name in ("grouped_mm", "batched_mm"):
        assert name in registry, f"{need}; {name!r} is not registered"
    _, la = _experts(impl="grouped_mm")
    calls = []

    def probe(module, *args, **kwargs):
        calls.append(module)
        return registry["grouped_mm"](module, *args, **kwargs)

    registry["swapmoe_probe"] = probe
    try:
        la.experts.config._experts_implementation = "swapmoe_probe"
        with torch.no_grad():
            la.experts(torch.zeros(2, la.experts.gate_up_proj.shape[-1]), torch.tensor([[0, 1], [1, 2]]),
                       torch.ones(2, 2))
    finally:
        del registry["swapmoe_probe"]
    assert calls == [la.experts], f"{need}; the experts forward did not call the function registered under its name"


# ------------------------------------------------------------------------------ routers
def test_phimoe_sparsemixer_is_the_routers_selection():
    need = ("transformers.models.phimoe.modeling_phimoe.sparsemixer(scores, jitter_eps, training, top_k): "
            "swapmoe's PhiMoE exchange rule calls it on masked logits and needs (weights [T, K], indices [T, K]) "
            "equal to what PhimoeRouter returns")
    try:
        from transformers.models.phimoe.modeling_phimoe import sparsemixer
    except ImportError as e:
        pytest.fail(f"{need}; it cannot be imported: {e}")
    model = build_model("phimoe")
    la = find_moe_layers(model)[0]
    x = torch.randn(16, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, weights, indices, _ = unpack_router_output(la.router(x), la.num_experts)
        w, idx = sparsemixer(logits, jitter_eps=model.config.router_jitter_noise, training=False, top_k=la.top_k)
    assert torch.equal(idx, indices), f"{need}; the indices differ"
    assert torch.equal(w.to(weights.dtype), weights), f"{need}; the weights differ"


@pytest.mark.parametrize("family", FAMILIES)
def test_router_returns_logits_weights_and_indices(family):
    need = (f"the {family} router's output: swapmoe's hook reads (logits [T, E], weights [T, K], indices [T, K]) "
            "from it, in any order (told apart by dtype and width), and returns the same layout")
    model = build_model(family)
    la = find_moe_layers(model)[0]
    x = torch.randn(7, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = call_router(la, x)
    assert isinstance(out, tuple) and len(out) == 3, f"{need}; it returned {type(out).__name__} of {len(out)}"
    logits, weights, indices, _ = unpack_router_output(out, la.num_experts)
    assert logits.shape == (7, la.num_experts) and logits.is_floating_point(), f"{need}; logits {logits.shape}"
    assert weights.shape == indices.shape == (7, la.top_k), f"{need}; weights {weights.shape}, indices {indices.shape}"
    assert not indices.is_floating_point() and int(indices.max()) < la.num_experts, f"{need}; indices {indices}"
    # the logits are the router's linear map of x (plus its bias where it has one): importance and the
    # exchange rules read them as the unmasked scores
    # (the weight may sit in a child Linear: HunYuan's gate.wg, AFMoE's router.gate)
    weight = la.router_weight
    owner = next(m for m in la.router.modules() if getattr(m, "weight", None) is weight)
    bias = getattr(owner, "bias", None)
    lin = torch.nn.functional.linear(x.to(weight.dtype), weight, bias if isinstance(bias, torch.Tensor) else None)
    torch.testing.assert_close(logits.float(), lin.float(), msg=lambda m: f"{need}; the logits are not x W^T: {m}")


@pytest.mark.parametrize(("family", "class_name", "adapter"), [
    ("llama4_text", "Llama4TextMoe", "swapmoe.adapters.llama4 replaces these blocks"),
    ("llama4_text", "Llama4TextExperts", "find_moe_layers refuses this dense experts module unadapted"),
    ("llama4_text", "Llama4Router", "the Llama 4 adapter reuses this router's weight"),
    ("switch_transformers", "SwitchTransformersSparseMLP", "swapmoe.adapters.switch replaces these blocks"),
    ("switch_transformers", "SwitchTransformersTop1Router", "the Switch adapter wraps this router"),
])
def test_adapters_find_the_classes_they_match_by_name(family, class_name, adapter):
    from tests.adapters.tiny import build_model as build_adapted

    need = f"class name {class_name!r} of transformers' {family}: {adapter} (matched by type(m).__name__)"
    names = {type(m).__name__ for m in build_adapted(family).modules()}
    assert class_name in names, f"{need}; the model has no module of that class (drifted?)"


# ------------------------------------------------------------------------------ cache argument
def test_cache_argument_is_the_one_this_release_takes():
    """``cache=`` since transformers 5.24 (``past_key_values=`` warns, and goes in 5.40), ``past_key_values=``
    before (5.17 has no ``cache``): :func:`swapmoe.compat.cache_kwargs` picks by the forward's signature."""
    import warnings

    from transformers import DynamicCache

    model = build_model("olmoe")
    ids = torch.tensor([[3, 4, 5]])
    cache = DynamicCache(config=model.config)
    kwargs = cache_kwargs(model, cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated argument name warns: fail on it
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **kwargs)
            model(input_ids=torch.tensor([[6]]), use_cache=True, **kwargs)
    assert cache.get_seq_length() == 4, (
        f"the cache passed as {next(iter(kwargs))}= was not filled: transformers ignored the argument name")
