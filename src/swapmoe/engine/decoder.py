"""The one batch-1 decode path: a prefill, then one step per token; on CUDA each step is one graph replay.

Every command that decodes goes through a :class:`Decoder` (the engine's streams, ``model.generate``
on a ``swapmoe.load`` model, ``eval``/``sweep``/``profile`` decode timing, benchmarks/decode.py).

Modes
    graph    CUDA: a ``StaticCache`` of fixed capacity and fixed input/output buffers; the first decode
             step after a (re)allocation runs eagerly, then the step is captured once with
             ``torch.cuda.CUDAGraph`` and every later step is one replay. A replay runs no Python, so
             the runtime's host side (mapping finished copies, starting updates, counting lookups) is
             called before each replay (:meth:`VirtualExperts.before_replay`), and the router hooks
             were captured doing only in-graph tensor work (:mod:`swapmoe.runtime.step`).
    static   the graph path without the capture, on any device: the same ``StaticCache``, and each decode
             step split as a replay splits it (the runtime's host side first, then a forward whose
             hooks do only in-graph work). CPU tests check the graph path's bookkeeping with it.
    dynamic  a ``DynamicCache``, every step an eager forward (CPU; models a graph cannot capture).

``compile_step=True`` (graph and static modes): the single-token step is compiled by inductor, without
inductor's own CUDA graphs, with the router hooks' in-graph work traced into it
(:mod:`swapmoe.engine.compiled_step`); graph mode runs the compiled step once, then captures it as
above. Off by default: inductor takes 35-50 s (cold cache, OLMoE size on the H200) before the first token,
which a short generation never earns back; verified on the H200 by tests/test_cuda.py ("compiled") and
measured by benchmarks/decode.py --compile-step (docs/benchmarks.md).

Prefill is always eager (one forward of the whole prompt): prompts vary in length, a captured
prefill would need one graph per length. The decode graph is kept across requests: a new request
resets the cache in place (same addresses), so the graph stays valid; only a request that needs a
longer cache allocates a larger one (capacities are powers of two, never shrinking) and captures anew.

    T = tokens of a forward, V = vocabulary size, L = cache capacity (tokens)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import torch

from swapmoe.compat import cache_argument
from swapmoe.engine.compiled_step import CompiledStep
from swapmoe.errors import first_line
from swapmoe.runtime.step import compiled_route

log = logging.getLogger(__name__)

MODES = ("graph", "static", "dynamic")


def plain_no_grad() -> contextlib.ExitStack:
    """No autograd, and no inference tensors even inside a caller's ``torch.inference_mode()``: the
    cache and graph buffers are kept across calls, some made under ``inference_mode`` (the CLI) and
    some not (``model.generate``, which uses ``no_grad``), and an inference tensor cannot be updated
    in place outside inference mode."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack
MIN_CAPACITY = 256  # smallest static cache (tokens): keeps short requests from re-capturing


def model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def step_blocker(model: Any) -> str | None:
    """Why a model's decode step cannot run as a fixed single-token step on a static cache (its work
    decided on the host inside the forward, or shapes that depend on the data), or None when it can.
    Such a step can be compiled (``compile_step``) even where it cannot be captured."""
    from swapmoe.adapters.base import SparseExperts
    from swapmoe.families import find_moe_layers

    if getattr(model.config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    placement = getattr(model, "hf_device_map", None) or {}
    if any(str(where) in ("cpu", "disk") for where in placement.values()):
        return "accelerate offloading (its hooks copy weights in during the forward)"
    runtime = getattr(model, "swapmoe", None)
    if getattr(runtime, "host_driven", False):
        return "on-demand loading (copies decided on the host inside the forward)"
    layers = [st.layer for st in runtime.layers] if runtime is not None else find_moe_layers(model)
    if any(isinstance(layer.experts, SparseExperts) for layer in layers):
        return "an adapted family (its experts dispatch on data-dependent shapes)"
    return None


def graph_blocker(model: Any) -> str | None:
    """Why a model's decode step cannot be captured in a CUDA graph, or None when it can.

    The model's own reasons come first (:func:`step_blocker`, then what only a capture refuses), the
    device last, so that the reason a user reads (in the log, or from ``Decoder(model, "graph")``) is
    the one that moving to a GPU would not remove.
    """
    from swapmoe.compat import eager_mask_is_capturable
    from swapmoe.families import find_moe_layers
    from swapmoe.runtime.step import uses_eager_kernel

    if (why := step_blocker(model)) is not None:
        return why
    runtime = getattr(model, "swapmoe", None)
    layers = [st.layer for st in runtime.layers] if runtime is not None else find_moe_layers(model)
    for layer in layers:
        if uses_eager_kernel(layer.experts):
            return "the 'eager' experts kernel (data-dependent nonzero); use grouped_mm or batched_mm"
        if _grouped_mm_off_bf16(layer):
            return ("grouped_mm on non-bfloat16 expert weights (it reads group offsets on the host); "
                    "load in bfloat16 or with experts_implementation='batched_mm'")
    if getattr(model.config, "_attn_implementation", None) == "eager" and not eager_mask_is_capturable():
        return ("eager attention on transformers < 5.21 (its mask copies a host scalar during the step); "
                "upgrade transformers for graph decoding")
    if model_device(model).type != "cuda":
        return "not on a CUDA device"
    return None


def _grouped_mm_off_bf16(layer: Any) -> bool:
    impl = getattr(getattr(layer.experts, "config", None), "_experts_implementation", None)
    if impl not in (None, "grouped_mm"):
        return False
    weight = getattr(layer.experts, layer.expert_param_names[0], None)
    return weight is not None and weight.dtype != torch.bfloat16


def _capacity(need: int, limit: int | None, smallest: int = MIN_CAPACITY) -> int:
    cap = smallest
    while cap < need:
        cap *= 2
    return min(cap, limit) if limit is not None else cap


class Decoder:
    """Batch-1 decoding of one model; see the module docstring for the modes.

    ``prefill`` and ``step`` return next-token logits on the device as float32 (``[T, V]`` for a
    prefill with ``all_logits``, else ``[V]``); :meth:`read_logits` brings a ``[V]`` row to the host
    through pinned memory (the one transfer a streamed token needs).
    """

    def __init__(self, model: Any, mode: str | None = None, min_capacity: int = MIN_CAPACITY,
                 fuse_router: bool | None = None, compile_step: bool = False, compile_mode: str = "default"
                 ) -> None:
        if mode is None:
            mode = "graph" if graph_blocker(model) is None else "dynamic"
        if mode not in MODES:
            raise ValueError(f"decode mode must be one of {MODES}, got {mode!r}")
        if mode == "graph" and (why := graph_blocker(model)) is not None:
            raise ValueError(f"this model's decode step cannot be captured in a CUDA graph: {why}")
        if compile_step and mode == "dynamic":
            raise ValueError("compile_step compiles the static-cache decode step: use mode 'graph' or 'static'")
        self.model = model
        self.mode = mode
        self.runtime = getattr(model, "swapmoe", None)  # None: plain transformers
        # the whole single-token step compiled by inductor (compiled_step.py); its router work is traced
        # into that graph, so the separately compiled router step is not used then
        self.compiled = CompiledStep(compile_mode) if compile_step else None
        # graph mode: the router hooks' tensor work compiled into a few kernels (runtime/step.py)
        fuse = mode == "graph" and not compile_step if fuse_router is None else fuse_router
        self.fused = compiled_route() if fuse and self.runtime is not None and not compile_step else None
        self.device = model_device(model)
        self.cache_kw = cache_argument(model)
        self.limit = context_length(model)
        self.min_capacity = min_capacity
        self.cache: Any = None
        self.capacity = 0
        # tokens in the cache (re-prefilled if the capacity runs out); device tensors for model.generate
        self.history: list[Any] = []
        self.hf_active = False  # a model.generate call is decoding through this decoder (hf_generate.py)
        self.graph: Any = None
        self.graphs_captured = 0
        self._input: torch.Tensor | None = None  # [1, 1] long: the captured step's input
        self._output: torch.Tensor | None = None  # [V] float32: the captured step's output
        self._host: torch.Tensor | None = None  # [V] float32 pinned: read-back of a streamed token
        self._read_done: Any = None

    # ------------------------------------------------------------------ cache
    def _new_cache(self, need: int) -> Any:
        from transformers import DynamicCache, StaticCache

        if self.mode == "dynamic":
            try:
                return DynamicCache(config=self.model.config)
            except TypeError:  # older transformers without the config argument
                return DynamicCache()
        self.capacity = _capacity(need, self.limit, self.min_capacity)
        self.graph = None  # a new cache has new addresses: capture again
        cache = StaticCache(config=self.model.config, max_cache_len=self.capacity)
        if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
            # transformers' static sliding-window layer keeps its length in a host int, which a graph
            # replay would never advance. Full-length static layers hold the same keys; the sliding
            # window is then applied by the attention mask, which transformers builds from positions
            # for sliding layers (tested against the dynamic cache, tests/engine/test_decoder.py).
            from transformers.cache_utils import StaticLayer

            cache.layers = [StaticLayer(max_cache_len=self.capacity) for _ in cache.layers]
        return cache

    def start(self, need: int) -> None:
        """Start a new sequence that will hold up to ``need`` tokens (prompt + generated)."""
        self.history = []
        if self.mode == "dynamic" or self.cache is None or need > self.capacity:
            self.cache = self._new_cache(need)
        else:
            self.cache.reset()  # in place: the captured graph keeps reading the same tensors

    # ---------------------------------------------------------------- forwards
    def _forward(self, ids: torch.Tensor, all_logits: bool, step: bool = False) -> torch.Tensor:
        # the model's own forward, also where model.generate's wrapper is installed (hf_generate.py)
        forward = self.model.__dict__.get("_swapmoe_plain_forward", self.model)
        with plain_no_grad():
            if step and self.compiled is not None:  # a single-token step on the static cache
                try:
                    return self.compiled(forward, ids, self.cache, self.cache_kw)  # [1, V]
                except torch._dynamo.exc.TorchDynamoException as e:
                    # dynamo fails before the compiled step runs anything (fullgraph): nothing half-done
                    log.warning("could not compile the decode step (%s); decoding with the uncompiled step",
                                first_line(e))
                    self.compiled = None
            out = forward(input_ids=ids, **{self.cache_kw: self.cache}, use_cache=True,
                             logits_to_keep=0 if all_logits else 1)
            return out.logits[0].float()  # [T or 1, V]

    def prefill(self, token_ids: Sequence[int], *, all_logits: bool = False, max_new_tokens: int = MIN_CAPACITY
                ) -> torch.Tensor:
        """A new sequence: the prompt in one eager forward. Returns ``[V]`` (or ``[T, V]``) float32 logits."""
        if not token_ids:
            raise ValueError("the prompt must contain at least one token")
        self.start(len(token_ids) + max(max_new_tokens, 1))
        return self._extend(list(token_ids), all_logits)

    def _extend(self, token_ids: list[int | torch.Tensor], all_logits: bool, step: bool = False) -> torch.Tensor:
        if isinstance(token_ids[0], torch.Tensor):
            ids = torch.stack([t.reshape(()) for t in token_ids]).view(1, -1).to(self.device)  # [1, T]
        else:
            ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # [1, T]
        logits = self._forward(ids, all_logits, step)
        self.history.extend(token_ids)
        return logits if all_logits else logits[-1]

    def step(self, token: int | torch.Tensor) -> torch.Tensor:
        """Feed one token; return the next-token logits ``[V]`` float32 on the device.

        ``token`` is a host int, or a device tensor of one id (``model.generate``'s sampled token: no
        host read). In graph mode the returned tensor is the graph's output buffer: read it (or copy
        it) before the next step.
        """
        if self.mode != "dynamic" and len(self.history) + 1 > self.capacity:
            self._grow()
        if self.mode == "static" and self.history:
            return self._split_step(token)
        if self.mode == "graph" and self.graph is None and self.compiled is not None and self.history:
            logits = self._split_step(token)  # compiles the step (or reuses it), then runs it once
            self._capture()
            return logits
        if self.mode != "graph" or self.graph is None:
            with self._fused_router():
                logits = self._extend([token], all_logits=False)
                if self.mode == "graph":
                    self._capture()  # after an eager step, which warmed up (and compiled) what it records
            return logits
        assert self._input is not None and self._output is not None
        with plain_no_grad():
            if isinstance(token, torch.Tensor):
                self._input.copy_(token.view(1, 1))  # device to device: no host sync
            else:
                self._input.fill_(token)  # a kernel with the id as argument: no host sync
        if self.runtime is not None:
            self.runtime.before_replay(1)
        self.graph.replay()
        self.history.append(token)
        return self._output

    def _split_step(self, token: int | torch.Tensor) -> torch.Tensor:
        """A step split as a replay splits it: the runtime's host side first (scheduling, mapping
        finished copies, counting), then a forward whose router hooks do in-graph work only; compiled
        with ``compile_step``. ``[V]`` logits."""
        if self.runtime is None:
            return self._extend([token], all_logits=False, step=True)
        self.runtime.before_replay(1)
        with self.runtime.capturing(), self._fused_router():
            return self._extend([token], all_logits=False, step=True)

    @contextlib.contextmanager
    def _fused_router(self) -> Any:
        """The runtime routes single-token calls through this decoder's compiled step meanwhile."""
        if self.fused is None:
            yield
            return
        previous, self.runtime.fused = self.runtime.fused, self.fused
        try:
            yield
        finally:
            if self.runtime.fused is None:  # its compile failed (VirtualExperts._on_route): not again
                self.fused = None
            self.runtime.fused = previous

    def _grow(self) -> None:
        """The cache is full: re-prefill the sequence into a cache twice as large (rare: callers size
        the cache from the request's max_tokens)."""
        if self.limit is not None and self.capacity >= self.limit:
            raise ValueError(f"the sequence reached the model's context length ({self.limit} tokens)")
        history = self.history
        log.info("decode cache full at %d tokens: re-prefilling into a larger cache", len(history))
        self.cache = self._new_cache(2 * self.capacity)
        self.history = []
        self._extend(history, all_logits=False)

    def _capture(self) -> None:
        """Capture one decode step at the current cache addresses (no kernel runs: nothing changes)."""
        with plain_no_grad():
            self._input = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        hooks = self.runtime.capturing() if self.runtime is not None else contextlib.nullcontext()
        try:
            with hooks, torch.cuda.graph(graph):
                self._output = self._forward(self._input, all_logits=False, step=True)[-1]  # [V]
        except RuntimeError as e:  # a kernel that reads device values on the host cannot be captured
            log.warning("could not capture the decode step (%s); decoding with eager forwards", first_line(e))
            self.mode = "static"
            torch.cuda.synchronize(self.device)
            return
        self.graph = graph
        self.graphs_captured += 1

    # ---------------------------------------------------------------- read-back
    def read_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``[V]`` logits on the host as float32: a non-blocking copy into pinned memory and a wait on
        its event (one transfer per token; no stream-wide synchronisation)."""
        if logits.device.type != "cuda":
            return logits.float().clone()
        if self._host is None or self._host.shape != logits.shape:
            self._host = torch.empty(logits.shape, dtype=torch.float32, pin_memory=True)
            self._read_done = torch.cuda.Event()
        self._host.copy_(logits, non_blocking=True)
        self._read_done.record()
        self._read_done.synchronize()
        return self._host.clone()


def context_length(model: Any) -> int | None:
    """The model's maximum sequence length (prompt + generated), or None when the config has none."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if value else None


def decoder_for(model: Any, mode: str | None = None) -> Decoder:
    """The model's decoder, created on first use and kept on the model (its graph and cache are reused
    by every request). ``mode`` None: the model's default (``model.swapmoe_decode_mode`` if set by
    ``swapmoe.load(cuda_graph=...)``, else graph where possible); the step is compiled where
    ``swapmoe.load(compile_step=True)`` asked for it."""
    mode = mode or getattr(model, "swapmoe_decode_mode", None)
    dec = model.__dict__.get("_swapmoe_decoder")
    if dec is None or (mode is not None and dec.mode != mode):
        resolved = mode or ("graph" if graph_blocker(model) is None else "dynamic")
        wants_compile = bool(getattr(model, "swapmoe_compile_step", False))
        if wants_compile and mode is None and model_device(model).type != "cuda" and step_blocker(model) is None:
            # on a CPU the compiled step runs on the static cache, uncaptured: inductor's fused C++ took the
            # reference model's decode from 11.8 to 6.1 ms/token (benchmarks/cpu_compile.py)
            resolved = "static"
        # swapmoe.load(compile_step=True): the static-cache modes compile their step; eager ones cannot
        compile_step = wants_compile and resolved != "dynamic"
        dec = Decoder(model, resolved, compile_step=compile_step)
        model.__dict__["_swapmoe_decoder"] = dec
    return dec


#: largest cache a primed compiled decoder holds for every request (tokens): the context length up to this
PRIME_MAX_CAPACITY = 8192


def prime_compiled_step(model: Any, max_capacity: int = PRIME_MAX_CAPACITY) -> Decoder | None:
    """Compile (and on CUDA capture) a ``compile_step`` model's decode step now, at the one cache capacity
    every later request will use, and leave the runtime as it was. None when the step is not compiled.

    A compiled step is compiled per cache capacity (its shapes are static), and the engine sizes a cache
    from each request (256, 512, ... tokens): a server would otherwise stall a request for a compile
    (about 50 s at OLMoE size on the H200) at its first request and again at each larger one. So the
    decoder's smallest cache becomes the context length (at most ``max_capacity``); a static cache's
    attention over the longer cache costs little next to the expert reads. The priming decode's effect
    on the resident sets, importance and counters is undone (``VirtualExperts.restore``).
    """
    dec = decoder_for(model)
    if dec.compiled is None:
        return None
    capacity = min(dec.limit, max_capacity) if dec.limit is not None else max_capacity
    dec.min_capacity = max(dec.min_capacity, capacity)
    runtime = dec.runtime
    snap = runtime.snapshot() if runtime is not None else None
    logits = dec.prefill([0, 1], max_new_tokens=dec.min_capacity - 2)  # a (new) cache of min_capacity tokens
    for _ in range(2):  # the first step compiles (and captures on CUDA), the second runs what requests will
        logits = dec.step(int(dec.read_logits(logits).argmax()))
    if runtime is not None:
        runtime.restore(snap)
        runtime.reset_stats()
    log.info("decode step compiled for a %d-token cache before serving", dec.capacity)
    return dec
