"""Loading a Hugging Face MoE checkpoint within a device-memory budget.

The checkpoint is read by transformers itself (so legacy per-expert names and fused names, sharded
or not, convert exactly as transformers converts them) into *host* memory. Then, per MoE layer, the
expert tensors become a host store (pinned on CUDA) and the experts module gets compact ``[S, ...]``
slot tensors on the device holding the initial resident set; everything that is not an expert goes
to the device. At no point are all experts on the device.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swapmoe.adapters import adapt
from swapmoe.budget import Budget, allocate_slots, parse_budget
from swapmoe.checkpoint import check_checkpoint
from swapmoe.errors import CheckpointError, PlanError, UnsupportedModelError
from swapmoe.families import MoELayer, auto_model_class, require_moe_layers, rule_for, supported_families
from swapmoe.fused import DEFAULT_MOE_KERNEL, check_moe_kernel, use_fused_kernel
from swapmoe.hostmem import return_freed_memory
from swapmoe.importance import expert_norms, expert_sq_norms, norms_from_squares
from swapmoe.mmap_store import SafetensorsFiles
from swapmoe.mxfp4 import FORMAT as MXFP4
from swapmoe.mxfp4 import QUANTISED as QUANTISED_MXFP4
from swapmoe.mxfp4 import Mxfp4Finder, Mxfp4Layout, checkpoint_is_mxfp4, find_parts
from swapmoe.mxfp4 import check_scales as check_mxfp4_scales
from swapmoe.mxfp4 import checkpoint_store as mxfp4_checkpoint_store
from swapmoe.mxfp4 import host_parts as mxfp4_host_parts
from swapmoe.pool import HostStore, SlotPool
from swapmoe.qexperts import install as install_quantised
from swapmoe.quant import ExpertLayout, check_expert_dtypes, expert_dtypes_per_layer, layer_expert_bytes
from swapmoe.runtime import LayerState, RuntimeConfig, VirtualExperts

log = logging.getLogger(__name__)

INITIAL_SETS = ("magnitude", "random", "first")


def default_model_path() -> Path:
    """The bundled reference model (``models/ref-moe`` of the source tree)."""
    return Path(__file__).resolve().parents[2] / "models" / "ref-moe"


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device 'cuda' was asked for but no CUDA GPU is visible: use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(table)} or 'auto'")
    return table[dtype]


def _load_on_host(path: Path, dtype: torch.dtype | str, use_safetensors: bool, trust_remote_code: bool,
                  experts_implementation: str | None, mxfp4: bool = False) -> nn.Module:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise UnsupportedModelError(
            f"transformers cannot read the config in {path} ({str(e).splitlines()[0]}); "
            f"swapmoe supports MoE families: {', '.join(supported_families())}"
        ) from None
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": use_safetensors,
                              "trust_remote_code": trust_remote_code}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    if mxfp4:  # the plain experts module (weights decoded, exactly), never the triton one swapmoe cannot slot
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    try:
        model = auto_model_class(config).from_pretrained(path, config=config, **kwargs)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise UnsupportedModelError(
                f"model type {config.model_type!r} is not a causal or seq2seq LM swapmoe can load; "
                f"supported MoE families: {', '.join(supported_families())}"
            ) from None
        raise CheckpointError(f"transformers could not load {path}: {e}") from None
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"transformers could not load the weights in {path}: {str(e).splitlines()[0]}") from None
    adapt(model)  # families outside the fused layout (Llama 4, Switch) get their sparse blocks
    return model.eval()


def _initial_experts(norms: torch.Tensor, num_slots: int, how: str, rng: random.Random) -> list[int]:
    """The first resident set of a layer, in slot order."""
    num = norms.shape[0]
    if how == "magnitude":
        chosen = torch.argsort(norms, descending=True, stable=True)[:num_slots].tolist()
    elif how == "random":
        chosen = rng.sample(range(num), num_slots)
    elif how == "first":
        chosen = list(range(num_slots))
    else:
        raise ValueError(f"initial must be one of {INITIAL_SETS}, got {how!r}")
    return sorted(chosen)


def _virtualise(layer: MoELayer, num_slots: int, initial: str, rng: random.Random, pin: bool,
                where: dict[str, Path] | None = None, layout: ExpertLayout | None = None,
                compute: torch.device | None = None,
                ) -> tuple[Any, torch.Tensor, list[int], dict[str, torch.dtype]]:
    """Take a layer's experts out of the module into a host store (or, with ``where``, leave them in
    the checkpoint files); leave placeholders behind. With a ``layout`` the store holds the experts
    quantised (quantised here, once, on ``compute`` (None: the host), or as each is read from the files)."""
    ex = layer.experts
    host = {n: ex._parameters[n].detach() for n in layer.expert_param_names}
    dtypes = {n: t.dtype for n, t in host.items()}
    norms = expert_norms(list(host.values()))
    first = _initial_experts(norms, num_slots, initial, rng)
    store: Any = None
    if where is not None:
        from swapmoe.mmap_store import discover

        store = discover(layer.name, host, where)
        if store is None:
            log.warning("MoE layer %s: its experts could not be matched to checkpoint tensors exactly; "
                        "they stay in host memory (over the host budget)", layer.name)
        elif layout is not None:
            store = store.with_layout(layout, compute)
    if store is None:  # the parts come back to host memory
        store = HostStore(layout.encode(host, compute_device=compute) if layout is not None else host, pin=pin)
    _leave_placeholders(layer, dtypes)
    return store, norms, first, dtypes


def _mxfp4_store(layer: MoELayer, num_slots: int, initial: str, rng: random.Random, pin: bool, keep: bool,
                 layout: Mxfp4Layout, keys: dict[str, str], files: SafetensorsFiles, streamed: dict[str, Any] | None,
                 ) -> tuple[Any, torch.Tensor, list[int], dict[str, torch.dtype]]:
    """A layer of an MXFP4 checkpoint held in the ``mxfp4`` format: its blocks and scales as the files
    store them, in a host store (``keep``), or left in the files and read per swap (beyond the host
    budget). transformers' decoded weights (dropped while streaming, once verified) give the norms."""
    norms, held = _norms(layer, streamed)
    first = _initial_experts(norms, num_slots, initial, rng)
    if keep:
        store: Any = HostStore(mxfp4_host_parts(layer.name, layout, keys, files, held), pin=pin)
    else:
        store = mxfp4_checkpoint_store(layer.name, layout, keys, files, held)
    _leave_placeholders(layer, layout.dtypes)
    return store, norms, first, layout.dtypes


def _norms(layer: MoELayer, streamed: dict[str, Any] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``||E_i||`` of a layer ``[E]`` (from the squares kept while streaming, and the parameters held),
    and the parameters held in memory (``name -> [E, ...]``)."""
    streamed = streamed or {}
    held = {n: layer.experts._parameters[n].detach() for n in layer.expert_param_names if n not in streamed}
    return norms_from_squares([streamed[n].norm_sq if n in streamed else expert_sq_norms(held[n])
                               for n in layer.expert_param_names]), held


def _from_stream(layer: MoELayer, num_slots: int, initial: str, rng: random.Random, streamed: dict[str, Any],
                 finder: Any, layout: ExpertLayout | None = None, compute: torch.device | None = None,
                 ) -> tuple[Any, torch.Tensor, list[int], dict[str, torch.dtype]]:
    """A layer whose experts were streamed past host memory during the load (swapmoe.streaming):
    a checkpoint store from the recipes verified then, with any parameter that could not be verified
    held in memory."""
    norms, held = _norms(layer, streamed)  # [E], as expert_norms computes it
    if held:
        log.warning("MoE layer %s: %s could not be matched to checkpoint tensors exactly; they stay in host "
                    "memory (over the host budget)", layer.name, ", ".join(held))
    shapes = {n: streamed[n].shape if n in streamed else held[n].shape for n in layer.expert_param_names}
    dtypes = {n: streamed[n].dtype if n in streamed else held[n].dtype for n in layer.expert_param_names}
    first = _initial_experts(norms, num_slots, initial, rng)
    store = finder.store({n: p.recipe for n, p in streamed.items()}, shapes, dtypes, held)
    if layout is not None:
        store = store.with_layout(layout, compute)
    _leave_placeholders(layer, dtypes)
    return store, norms, first, dtypes


def _leave_placeholders(layer: MoELayer, dtypes: dict[str, torch.dtype]) -> None:
    """Empty parameters where a virtualised layer's experts were; the slot tensors replace them."""
    for n in layer.expert_param_names:
        layer.experts._parameters[n] = nn.Parameter(torch.empty(0, dtype=dtypes[n]), requires_grad=False)


def _slots(layers: list[MoELayer], budget: Budget | None, slots: list[int] | None,
           fmts: list[str | None] | None = None) -> tuple[list[int], int, int]:
    """(slots per layer, budget bytes, all expert bytes) for a budget or explicit slots, with each
    layer's experts held in its format (``fmts``, one per layer; None: as the model holds them): a
    share of a budget is of all experts as the model holds them; each layer's slots are counted in
    the bytes of its format (a quantised expert is smaller, so the same bytes hold more of them)."""
    fmts = fmts if fmts is not None else [None] * len(layers)
    total = sum(la.expert_bytes() * la.num_experts for la in layers)
    expert_bytes = [stored_expert_bytes(la, f) for la, f in zip(layers, fmts, strict=True)]
    if budget is not None:
        budget_bytes = budget.resolve(total)
        return (allocate_slots(budget_bytes, expert_bytes, [la.num_experts for la in layers],
                               [la.top_k for la in layers]), budget_bytes, total)
    from swapmoe.plan import check_slots

    assert slots is not None
    check_slots(slots, layers)
    return slots, sum(s * b for s, b in zip(slots, expert_bytes, strict=True)), total


def _in_host(layers: list[MoELayer], slots: list[int], host_bytes: int | None,
             fmts: list[str | None] | None = None) -> list[bool]:
    """Per layer: are its experts kept in host memory? Whole layers that fit the host budget (each in
    the bytes of its format), first layers first (None: no host budget, all of them). Layers kept whole
    on the device need neither."""
    out = []
    left = host_bytes
    fmts = fmts if fmts is not None else [None] * len(layers)
    for la, s, fmt in zip(layers, slots, fmts, strict=True):
        size = stored_expert_bytes(la, fmt) * la.num_experts
        keep = s >= la.num_experts or left is None or left >= size
        if left is not None and s < la.num_experts and keep:
            left -= size
        out.append(keep)
    return out


def _layout(layer: MoELayer, fmt: str | None) -> ExpertLayout | Mxfp4Layout | None:
    """How a layer's experts are stored in ``fmt`` (None: as the model holds them)."""
    if fmt is None:
        return None
    params = {n: getattr(layer.experts, n) for n in layer.expert_param_names}
    return Mxfp4Layout.of(params) if fmt == MXFP4 else ExpertLayout.of(params, fmt)


def stored_expert_bytes(layer: MoELayer, fmt: str | None) -> int:
    """Bytes of one expert of ``layer`` as its slots and store hold it in ``fmt`` (scales included)."""
    params = {n: getattr(layer.experts, n) for n in layer.expert_param_names}
    if fmt == MXFP4:
        return Mxfp4Layout.of(params).expert_bytes()
    return layer_expert_bytes({n: tuple(p.shape) for n, p in params.items()},
                              {n: p.dtype for n, p in params.items()}, fmt)


def _formats(expert_dtype: str | list[str | None] | None, layers: list[MoELayer], dtype: torch.dtype,
             mxfp4_layers: Any = ()) -> list[str | None]:
    """One format per MoE layer: what ``expert_dtype`` asks for; a layer stored in MXFP4 in the
    checkpoint (its block name in ``mxfp4_layers``) and asked for nothing keeps the checkpoint's
    MXFP4 parts (an explicit ``bf16``/``int8``/``int4`` converts it from MXFP4 at load)."""
    fmts = expert_dtypes_per_layer(expert_dtype, len(layers), dtype)
    asked = expert_dtype if isinstance(expert_dtype, (list, tuple)) else [expert_dtype] * len(layers)
    return [MXFP4 if la.name in mxfp4_layers and a is None else f for la, f, a in zip(layers, fmts, asked, strict=True)]


def _expert_streamer(ckpt: Any, host: Budget | None, budget: Budget | None, slots: list[int] | None,
                     dtype: torch.dtype, trust_remote_code: bool, where: dict[str, Path],
                     fmt: str | list[str | None] | None = None, files: SafetensorsFiles | None = None) -> Any:
    """Which expert parameters need never be held in host memory (the layers beyond the host
    budget, and the MXFP4 matrices of an MXFP4 checkpoint's layers held as MXFP4), worked out on a
    meta-device skeleton before anything is read; an MXFP4 checkpoint's parts are checked here too
    (the streamer's ``mxfp4``: block name -> part -> key)."""
    from swapmoe.inspect import meta_model
    from swapmoe.streaming import ExpertStreamer

    skeleton = meta_model(ckpt, trust_remote_code, dtype)  # the dtype the load will use: same bytes
    layers = require_moe_layers(skeleton)
    files = files if files is not None else SafetensorsFiles(where)
    mx = _mxfp4_parts(ckpt, skeleton, layers, files)  # shapes checked before transformers reads a byte
    for keys in mx.values():
        check_mxfp4_scales(keys, files)
    fmts = _formats(fmt, layers, dtype, mx)
    per_layer, _, total = _slots(layers, budget, slots, fmts)
    names = {id(m): n for n, m in skeleton.named_modules()}
    in_host = _in_host(layers, per_layer, host.resolve(total) if host is not None else None, fmts)
    targets = {}
    for la, keep, f in zip(layers, in_host, fmts, strict=True):
        # a layer held as MXFP4 parts needs none of transformers' decoded weights beyond their norms
        streamed = [p for p in la.expert_param_names if p in QUANTISED_MXFP4] if f == MXFP4 else \
            (la.expert_param_names if not keep else [])
        targets.update({f"{names[id(la.experts)]}.{p}": (la.name, p) for p in streamed})
    streamer = ExpertStreamer(targets, where, mxfp4=mx)
    streamer.finders.update({name: Mxfp4Finder(keys, files) for name, keys in mx.items()})
    return streamer


def _mxfp4_parts(ckpt: Any, model: nn.Module, layers: list[MoELayer], files: SafetensorsFiles,
                 ) -> dict[str, dict[str, str]]:
    """The MXFP4 parts of each layer of an MXFP4 checkpoint stored so (swapmoe.mxfp4.find_parts), checked
    against ``model``'s shapes; {} for any other checkpoint."""
    return find_parts(model, layers, files) if checkpoint_is_mxfp4(ckpt.config) else {}


def load(
    path: str | Path | None = None,
    memory_budget: str | int | float | Budget | None = None,
    *,
    slots: list[int] | None = None,
    host_budget: str | int | float | Budget | None = None,
    plan: str | Path | Any | None = None,
    strategy: str | None = None,
    update_interval: int | None = None,
    swaps_per_update: int | None = None,
    decay: float = 0.98,
    importance: str = "paper",
    initial: str = "magnitude",
    seed: int = 0,
    async_swaps: bool = True,
    cuda_graph: bool = True,
    moe_kernel: str = DEFAULT_MOE_KERNEL,
    compile_step: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    expert_dtype: str | list[str | None] | None = None,
    experts_implementation: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """Load a Hugging Face MoE checkpoint with only a budget's worth of experts on the device.

    Returns an ordinary transformers causal LM (``generate`` works as usual) with the Virtual
    Experts runtime attached as ``model.swapmoe`` (counters: ``model.swapmoe.stats()``).

    memory_budget  bytes of expert weights on the device: ``"6GiB"``, ``"40%"``, ``0.4``; None = 100%
    slots          explicit slots per MoE layer; instead of ``memory_budget``
    host_budget    host memory for expert weights (same forms as ``memory_budget``); experts of the
                   layers beyond it stay in the memory-mapped safetensors and are read per swap.
                   None: every virtualised layer's experts are held in host memory
    plan           a plan file from ``swapmoe plan`` (or a :class:`swapmoe.plan.Plan`): its slots,
                   schedule and strategy, instead of ``memory_budget``; explicit arguments win
    strategy       Masked Gating for missing experts: "exchange" (default) or "skip"
    update_interval, swaps_per_update   the update schedule (default 16 tokens, 1 swap per layer)
    initial        first resident set: "magnitude" (largest ||E_i||), "random" (seeded) or "first"
    cuda_graph     on CUDA, decode each token as one CUDA graph replay (``model.generate`` included,
                   for batch-1 greedy or sampled calls; swapmoe.engine.decoder); False: eager forwards
    moe_kernel     expert compute of decode steps: "auto" (default: swapmoe's fused Triton kernel over slot
                   ids, on CUDA with Triton, in the layers swapmoe computes itself), "transformers"
                   (transformers' kernels everywhere) or "triton" (the fused kernel in every MoE layer it
                   supports); prefills keep transformers' kernels (swapmoe.fused)
    compile_step   compile that decode step with inductor before capturing it (fewer, fused kernels per
                   token; swapmoe.engine.compiled_step); the first decode step then takes the compile time
                   (about 50 s at OLMoE size on the H200, cold cache), then 1.9x faster decode there. On a
                   CPU the engine then decodes on the static cache with the compiled step (2.2x on the
                   reference model; docs/benchmarks.md)
    path           a checkpoint directory, or a Hugging Face repo id ("org/name") at ``revision``
    expert_dtype   "bf16", "int8", "int4", "int3" or "int2": experts held quantised (weight-only, group-wise; swapmoe.quant)
                   in the host store, the checkpoint-backed store and the slots, and the budget counted in
                   their bytes; None (default): the model's dtype, nothing changes. A list: one format per
                   MoE layer (None entries: the model's dtype), each layer's store and slots in its own
                   format and its slots counted in that format's bytes; a plan may carry such a list
    """
    if plan is not None:
        from swapmoe.plan import Plan, read_plan

        if memory_budget is not None or slots is not None:
            raise PlanError("give a plan or a memory budget (or slots), not both: the plan sets the slots")
        p = plan if isinstance(plan, Plan) else read_plan(plan)
        slots = list(p.slots)
        strategy = strategy if strategy is not None else p.strategy
        update_interval = update_interval if update_interval is not None else p.update_interval
        swaps_per_update = swaps_per_update if swaps_per_update is not None else p.swaps_per_update
        expert_dtype = expert_dtype if expert_dtype is not None else p.expert_dtype
    strategy = strategy if strategy is not None else "exchange"
    update_interval = update_interval if update_interval is not None else 16
    swaps_per_update = swaps_per_update if swaps_per_update is not None else 1
    host = parse_budget(host_budget) if host_budget is not None else None  # malformed: fail before loading
    check_expert_dtypes(expert_dtype)  # a malformed expert dtype fails before loading too
    check_moe_kernel(moe_kernel)
    ckpt = check_checkpoint(path if path is not None else default_model_path(), allow_pickle=allow_pickle,
                            revision=revision)  # a repo id (org/name) resolves through the Hub cache
    if host is not None and not ckpt.use_safetensors:
        raise CheckpointError("a host budget needs a safetensors checkpoint (experts are read from its files); "
                              "convert the checkpoint, or drop --host-budget")
    mxfp4 = checkpoint_is_mxfp4(ckpt.config)  # gpt-oss as published: experts as MXFP4 blocks and scales
    if mxfp4 and not ckpt.use_safetensors:
        raise CheckpointError("an MXFP4 checkpoint must be in safetensors files (its blocks and scales are read "
                              "from them); convert the checkpoint")
    # a malformed budget fails here, before minutes of loading
    budget = parse_budget(memory_budget if memory_budget is not None else "100%") if slots is None else None
    dev = resolve_device(device)
    config = RuntimeConfig(
        update_interval=update_interval, swaps_per_update=swaps_per_update, decay=decay,
        strategy=strategy, importance=importance, async_swaps=async_swaps,
    )
    where = None
    streamer = None
    load_dtype = resolve_dtype(dtype)
    mx: dict[str, dict[str, str]] = {}  # MXFP4 checkpoint: block name -> MXFP4 part -> key
    files = None
    if host is not None or mxfp4:
        from swapmoe.mmap_store import weight_files

        where = weight_files(ckpt.weight_files)
        files = SafetensorsFiles(where)  # opened once: the checks, the streamer and the stores read through it
        # the plan made before loading must see the bytes the load will have: no "auto" left to decide
        load_dtype = load_dtype if isinstance(load_dtype, torch.dtype) else ckpt.auto_dtype()
        streamer = _expert_streamer(ckpt, host, budget, slots, load_dtype, trust_remote_code, where, expert_dtype,
                                    files)
        mx = streamer.mxfp4
    t_read = time.perf_counter()
    with streamer if streamer is not None else contextlib.nullcontext():
        model = _load_on_host(ckpt.path, load_dtype, ckpt.use_safetensors, trust_remote_code, experts_implementation,
                              mxfp4)
    t_experts = time.perf_counter()
    layers = require_moe_layers(model)
    compute_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    fmts = _formats(expert_dtype, layers, compute_dtype, mx)  # one format per MoE layer
    slots, budget_bytes, total = _slots(layers, budget, slots, fmts)
    expert_bytes = [stored_expert_bytes(la, f) for la, f in zip(layers, fmts, strict=True)]
    layouts = [_layout(la, f) for la, f in zip(layers, fmts, strict=True)]

    rng = random.Random(seed)
    pin = dev.type == "cuda"
    # quantisation at load runs on the GPU when there is one (HQQ's int3/int2 zero points take minutes
    # on a few CPU cores), in chunks that bound its device memory (quant.DEVICE_CHUNK_VALUES)
    compute = dev if dev.type == "cuda" else None
    in_host = _in_host(layers, slots, host.resolve(total) if host is not None else None, fmts)
    staged = []
    full_parts: dict[str, dict[str, torch.Tensor]] = {}  # full quantised layers: their parts [E, ...]
    for la, s, keep, layout in zip(layers, slots, in_host, layouts, strict=True):
        streamed = streamer.streamed.get(la.name) if streamer is not None else None
        if isinstance(layout, Mxfp4Layout):  # the checkpoint's own parts, read from the files
            if s >= la.num_experts:
                norms, held = _norms(la, streamed)
                full_parts[la.name] = mxfp4_host_parts(la.name, layout, mx[la.name], files, held)
                _leave_placeholders(la, layout.dtypes)
                staged.append((la, None, norms, None, None))
            else:
                staged.append((la, *_mxfp4_store(la, s, initial, rng, pin, keep, layout, mx[la.name], files, streamed)))
            continue
        if streamed and s >= la.num_experts:
            raise RuntimeError(f"{la.name} was streamed past host memory but is to be kept whole on the device: "
                               "the plan made before loading disagrees with the loaded model (a bug)")
        if s >= la.num_experts:
            params = {n: getattr(la.experts, n).detach() for n in la.expert_param_names}
            norms = expert_norms(list(params.values()))
            if layout is not None:  # quantised: the whole layer's parts (on a CUDA device already; else moved below)
                full_parts[la.name] = layout.encode(params, compute_device=compute, out_device=compute)
                _leave_placeholders(la, layout.dtypes)
            staged.append((la, None, norms, None, None))
        elif streamed:
            staged.append((la, *_from_stream(la, s, initial, rng, streamed, streamer.finders[la.name], layout,
                                             compute)))
        else:
            staged.append((la, *_virtualise(la, s, initial, rng, pin, None if keep else where, layout, compute)))
    t_device = time.perf_counter()
    model.to(dev)  # non-expert weights (and experts of full layers) only

    states = []
    for (la, store, norms, first, dtypes), b, layout in zip(staged, expert_bytes, layouts, strict=True):
        pool = None
        if store is not None:
            pool = SlotPool.create(store, first, dev, dtypes)
            if layout is not None:
                install_quantised(la.experts, layout, pool.slots)  # the slots hold parts, not parameters
            else:
                for n, t in pool.slots.items():
                    la.experts._parameters[n] = nn.Parameter(t, requires_grad=False)
            la.experts.num_experts = pool.num_slots
            # transformers' kernels skip expert ids >= num_experts only in this mode (5.23; always in 5.17)
            la.experts._is_expert_parallel = True
        elif layout is not None:  # a full quantised layer: every expert's parts on the device
            install_quantised(la.experts, layout, {n: t.to(dev) for n, t in full_parts.pop(la.name).items()})
        rule, params = rule_for(model.config.model_type, la.router, la.top_k, compute_dtype, block=la.block)
        states.append(
            LayerState(
                layer=la, pool=pool, rule=rule, params=params, norms=norms.to(dev),
                importance=torch.zeros(la.num_experts, dtype=torch.float32, device=dev),
                full_bytes=b * la.num_experts, hits=torch.zeros((), dtype=torch.long, device=dev),
            )
        )
    model.swapmoe = VirtualExperts(states, config, dev, budget_bytes, total)
    # where a load's time goes (seconds): reading and converting the checkpoint (transformers), the
    # experts' norms, host stores and quantisation, then the device (weights and slots)
    done = time.perf_counter()
    model.swapmoe.load_seconds = {"read": t_experts - t_read, "experts": t_device - t_experts,
                                  "device": done - t_device}
    log.info("loaded in %.1f s: read %.1f s, experts %.1f s, device %.1f s", done - t_read,
             *model.swapmoe.load_seconds.values())
    ours = [(st.layer.experts, st.pool is not None or lay is not None) for st, lay in zip(states, layouts, strict=True)]
    for line in use_fused_kernel(ours, moe_kernel, dev):
        log.info("transformers' experts kernel kept in %s", line)
    _use_decoder(model, cuda_graph, compile_step)
    return_freed_memory()  # the load's temporaries
    return model


def _use_decoder(model: nn.Module, cuda_graph: bool, compile_step: bool = False) -> None:
    """Choose how the model decodes: on CUDA by default one graph replay per token, through the
    engine's decoder and through ``model.generate`` (swapmoe.engine.hf_generate); with
    ``compile_step`` the static-cache decoders compile their step first (swapmoe.engine.decoder_for)."""
    from swapmoe.engine.decoder import graph_blocker
    from swapmoe.engine.hf_generate import install

    model.swapmoe_compile_step = compile_step
    if not cuda_graph:
        model.swapmoe_decode_mode = "dynamic"
        return
    why = graph_blocker(model)
    if why is None:
        install(model, "graph")
    elif model.device.type == "cuda":
        log.info("decoding with eager forwards: the decode step cannot be captured (%s)", why)
