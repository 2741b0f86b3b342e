"""The single-token decode step compiled by inductor, for the decoder to capture in its own CUDA graph.

A captured decode step replays ~1,650 kernels per token on an OLMoE-1B-7B-sized model (RMSNorms, RoPE,
q/k norms, residual adds, cache writes, attention glue: several small kernels each per layer); kernel
count, not bytes, bounds it. Inductor fuses those pointwise and reduction chains. It is used *without*
its own CUDA graphs (``torch.compile(mode="reduce-overhead")`` failed on the GPU, and the decoder must
run the scheduler between replays anyway): the decoder runs the compiled step eagerly first (which
compiles it), then captures it with ``torch.cuda.CUDAGraph`` as it captures the uncompiled step.

What is traced: transformers' forward on the ``StaticCache`` (its cache writes are in-place
``index_copy_`` at device-side positions) and the swapmoe router hooks in their in-graph form
(:func:`swapmoe.runtime.step.route`: Masked Gating through the device maps, importance, hit
counting). The maps and slot tensors are graph inputs read at run time (no freezing), so the
scheduler's in-place map flips and slot copies between replays are seen by the next step. The
scheduler itself never runs inside: the decoder calls it before each step, outside the compiled code.

Compiles: one per decode step shape and per change of what the guards watch (the model, the cache's
capacity, the runtime's strategy), never per token: every tensor shape of a single-token step is fixed
and the position lives on the device. :attr:`CompiledStep.compiles` counts the graphs inductor built.
A hook with Python side effects (appending to a list, say) would be guarded on and recompile every step:
keep hooks on a compiled model free of them. A step dynamo cannot trace whole (``fullgraph``) is
decoded uncompiled instead, with a warning (:meth:`Decoder._forward`).

The first step pays the compile (seconds for the tiny test models on a CPU; more for a real-size model
with a cold inductor cache). Inductor also starts its pool of compile workers then, which competes
with the host work of the first steps after a compile: time decode steps only after those.

On the H200 it takes an OLMoE-sized step from ~1,600 to ~400 kernels, 1.9x faster (1.89 ms/token at 50%
with the fused MoE kernel; docs/benchmarks.md); off by default because the compile (about 50 s there,
cold cache) costs more than a short generation gains.
"""

from __future__ import annotations

import types
from typing import Any

import torch

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def _step_logits(forward: Any, ids: torch.Tensor, cache: Any, cache_kw: str) -> torch.Tensor:
    """One single-token forward on the static cache; ``[1, V]`` float32 next-token logits."""
    out = forward(input_ids=ids, **{cache_kw: cache}, use_cache=True, logits_to_keep=1)
    return out.logits[0].float()  # [1, V]


class CompiledStep:
    """:func:`_step_logits` compiled by inductor for one decoder (see the module docstring)."""

    def __init__(self, mode: str = "default", fullgraph: bool = True) -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES} (inductor without its own CUDA "
                             f"graphs: the decoder captures the step itself), got {mode!r}")
        self.mode = mode
        self.compiles = 0  # graphs inductor built for this decoder's step (a graph break adds one)
        self.ops: set[str] = set()  # the operators those graphs call (which kernels the step holds)
        # A code object of its own: dynamo caches compiled code per code object, with a limit on entries
        # (torch._dynamo.config.recompile_limit) past which it silently runs eagerly. Decoders of
        # different models would otherwise share one code object and use that limit up between them.
        fn = types.FunctionType(_step_logits.__code__.replace(), _step_logits.__globals__, _step_logits.__name__)
        self._fn = torch.compile(fn, backend=self._backend, fullgraph=fullgraph, dynamic=False)

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        self.ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        patches = {
            **list_mode_options(self.mode),
            "triton.cudagraphs": False,  # off in both modes: the decoder captures the step itself
            # round bf16/fp16 intermediates where the eager step rounds them: without it inductor keeps
            # them in float32 and bf16 logits drift from the uncompiled step's (greedy tokens then differ
            # at near-ties); with it they are bit-identical on the CPU (tests/engine/test_compiled_step.py)
            "emulate_precision_casts": True,
        }
        return compile_fx(gm, example_inputs, config_patches=patches)

    def __call__(self, forward: Any, ids: torch.Tensor, cache: Any, cache_kw: str) -> torch.Tensor:
        return self._fn(forward, ids, cache, cache_kw)
