"""Choosing and installing the fused Triton MoE kernel (swapmoe.kernels.fused_moe) for decode calls.

A batch-1 decode step spends its time launching kernels, not reading weights (docs/benchmarks.md):
transformers' grouped_mm path is about a dozen launches per MoE layer. :class:`FusedForward` becomes an
experts module's ``forward`` and sends a *decode-sized* call (at most :data:`MAX_TERMS` (token, expert)
terms, on a device the kernel runs on, no autograd) to the two-launch fused kernel, reading the slot
tensors in place; any other call (a prefill, a CPU forward) goes to the forward it replaced (transformers'
own experts kernel, or :class:`swapmoe.qexperts.QuantisedForward`). The choice depends on shapes only,
so a captured decode graph would always hold the fused kernel and an eager prefill grouped_mm.

Which modules it serves (:func:`unsupported` says why not, in one line): transformers' fused experts
(``@use_experts_implementation``) with a gate whose activation is SiLU-gated (concatenated halves) or
gpt-oss's clamped SwiGLU (interleaved, with biases), weights in a float dtype or swapmoe's int8, int4,
int3 or int2 format (:data:`KERNEL_FORMATS`, ``[S, out, in]`` layout); not a post-expert norm, not MXFP4.

``moe_kernel`` (``swapmoe.load(moe_kernel=...)``, ``--moe-kernel``). On the H200 the kernel is 2 launches
per layer where grouped_mm is 32, 42 against 103 us per OLMoE-sized layer; a decode step at 50% ran 1.3x
faster with it, int8 experts 3.9x (docs/benchmarks.md). Hence the default:
    auto          the default: the fused kernel on the layers swapmoe computes itself (virtualised or
                  quantised) when the model is on CUDA and Triton imports; a layer left as transformers
                  built it (every expert resident, full precision) keeps transformers' kernels, so a 100%
                  budget stays bit-identical to plain transformers; off CUDA nothing changes
    transformers  transformers' experts kernels everywhere
    triton        the fused kernel on every MoE layer that it supports (an error when Triton is missing)

Plain transformers users can select it without swapmoe's runtime: :func:`register_experts_implementation`
adds ``"swapmoe_fused"`` to transformers' ``ExpertsInterface`` (a process-wide registry, so only when
called), then ``model.set_experts_implementation("swapmoe_fused")``; calls that are not decode-sized
run grouped_mm.

    T = tokens, K = experts per token, S = slots (or E experts), H = hidden size, I = intermediate size
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from swapmoe.errors import SwapMoEError
from swapmoe.quant import PACKED_BITS

MOE_KERNELS = ("transformers", "auto", "triton")
DEFAULT_MOE_KERNEL = "auto"  # measured on the H200: 1.3x faster decode at 50%, 3.9x with int8 (docs/benchmarks.md)
#: most (token, expert) terms a call may have to take the fused kernel. Each term reads its expert's
#: weights itself, so a call whose terms share experts (a prefill) re-reads them; up to a few dozen terms
#: (a decode step: T=1, K<=8, or a short multi-token step) launch count dominates and fusing wins.
MAX_TERMS = 64
REGISTERED_NAME = "swapmoe_fused"
ACT_SILU, ACT_GPT_OSS = 0, 1  # as swapmoe.kernels.fused_moe numbers them (that module needs Triton)
#: swapmoe.quant formats the kernel dequantises in its loads, and the bits of their codes
#: (``ExpertTensors.bits``). Each is verified on the H200 against a float64 reference and inside a captured
#: decode (tests/test_fused_moe_cuda.py), so ``auto`` takes all of them (docs/benchmarks.md has the speeds)
KERNEL_FORMATS = {"int8": 8, **PACKED_BITS}


class MoEKernelError(SwapMoEError):
    """A ``moe_kernel`` choice that cannot be honoured."""


def triton_available() -> bool:
    """Does Triton import here? (The first call imports it, about a second; later ones find it loaded.)"""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install (e.g. a Triton that does not match torch)
        return False
    return True


def check_moe_kernel(value: str) -> str:
    if value not in MOE_KERNELS:
        raise MoEKernelError(f"unknown MoE kernel {value!r}: choose one of {', '.join(MOE_KERNELS)} (--moe-kernel)")
    return value


@dataclass(frozen=True)
class GateSpec:
    """How an experts module gates: the kernel's activation, gate/up row order and gpt-oss's constants."""

    act: int
    interleaved: bool
    alpha: float = 1.702
    limit: float = 7.0


def _gate_candidates(module: nn.Module) -> list[GateSpec]:
    alpha, limit = getattr(module, "alpha", None), getattr(module, "limit", None)
    specs = [GateSpec(ACT_SILU, False), GateSpec(ACT_SILU, True)]
    if isinstance(alpha, (int, float)) and isinstance(limit, (int, float)):
        specs += [GateSpec(ACT_GPT_OSS, True, float(alpha), float(limit)),
                  GateSpec(ACT_GPT_OSS, False, float(alpha), float(limit))]
    return specs


def gate_formula(y: torch.Tensor, spec: GateSpec) -> torch.Tensor:
    """The gated activation the kernel computes for ``spec`` on gate/up projections ``y [..., 2I]``."""
    gate, up = (y[..., 0::2], y[..., 1::2]) if spec.interleaved else y.chunk(2, dim=-1)
    if spec.act == ACT_SILU:
        return nn.functional.silu(gate) * up
    g = gate.clamp(max=spec.limit)
    return (up.clamp(-spec.limit, spec.limit) + 1) * g * torch.sigmoid(spec.alpha * g)


def gate_spec(module: nn.Module) -> GateSpec | None:
    """The module's gated activation, identified by running its own ``_apply_gate`` on a probe (so a
    family that changes its activation is refused, not silently computed wrong); None when it is none
    that the kernel computes."""
    apply_gate = getattr(module, "_apply_gate", None)
    if apply_gate is None:
        return None
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(4, 16, generator=gen, dtype=torch.float64) * 6  # [4, 2I]: past gpt-oss's clamp (7)
    try:
        got = apply_gate(y)
    except Exception:  # an activation that cannot run on a float64 CPU probe is not one we know
        return None
    for spec in _gate_candidates(module):
        if got.shape == (4, 8) and torch.allclose(got, gate_formula(y, spec), rtol=1e-9, atol=1e-9):
            return spec
    return None


def unsupported(module: nn.Module) -> str | None:
    """Why the fused kernel cannot compute this experts module, or None when it can (pure: reads the
    module, changes nothing)."""
    fwd = module.__dict__.get("forward")
    if isinstance(fwd, FusedForward):
        return None
    if not hasattr(module, "has_gate") or not hasattr(module, "is_transposed"):
        return "not a transformers fused-experts module (@use_experts_implementation)"
    if not module.has_gate:
        return "experts without a gate (up projection only)"
    if getattr(module, "has_post_expert_norm", False):
        return "a norm after each expert"
    if gate_spec(module) is None:
        return "a gated activation other than SiLU-gated or gpt-oss's clamped SwiGLU"
    if _is_quantised(fwd):
        if fwd.layout.fmt not in KERNEL_FORMATS:
            return (f"experts held as {fwd.layout.fmt} (the kernel reads float weights, "
                    f"{', '.join(KERNEL_FORMATS)})")
        if module.is_transposed:
            return f"{fwd.layout.fmt} experts in the transposed layout"
        return None
    if fwd is not None:
        return "its forward is already replaced by another wrapper"
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(module, name, None)
        if not isinstance(w, torch.Tensor) or w.dim() != 3 or not w.is_floating_point():
            return f"no floating-point [E, ...] tensor {name}"
    return None


def _is_quantised(fwd: Any) -> bool:
    from swapmoe.qexperts import QuantisedForward

    return isinstance(fwd, QuantisedForward)


def expert_tensors(module: nn.Module, spec: GateSpec, quantised: Any = None) -> Any:
    """The module's current ``[S, ...]`` tensors as :class:`swapmoe.kernels.fused_moe.ExpertTensors`
    (``quantised``: its :class:`~swapmoe.qexperts.QuantisedForward`, whose parts are the slots). Read at
    every call: a swap writes into these tensors in place, a reload may replace them."""
    from swapmoe.kernels.fused_moe import ExpertTensors

    bias = bool(getattr(module, "has_bias", False))
    if quantised is not None:
        p = quantised.parts
        return ExpertTensors(
            gate_up=p["gate_up_proj.q"], down=p["down_proj.q"],
            gate_up_scale=p["gate_up_proj.scale"], down_scale=p["down_proj.scale"],
            gate_up_bias=p["gate_up_proj_bias"] if bias else None, down_bias=p["down_proj_bias"] if bias else None,
            transposed=bool(module.is_transposed), interleaved=spec.interleaved,
            gate_up_zero=p.get("gate_up_proj.zero"), down_zero=p.get("down_proj.zero"),  # int4, int3, int2
            bits=KERNEL_FORMATS[quantised.layout.fmt],
        )
    return ExpertTensors(
        gate_up=module.gate_up_proj, down=module.down_proj,
        gate_up_bias=module.gate_up_proj_bias if bias else None, down_bias=module.down_proj_bias if bias else None,
        transposed=bool(module.is_transposed), interleaved=spec.interleaved,
    )


def decode_sized(hidden: torch.Tensor, top_k_index: torch.Tensor, devices: tuple[str, ...],
                 max_terms: int = MAX_TERMS) -> bool:
    """Does a call take the fused kernel? A few terms, on a device it runs on, and no autograd
    (the kernel has no backward). Shapes and flags only: the same answer at capture and at replay."""
    return (hidden.device.type in devices and top_k_index.numel() <= max_terms
            and not (torch.is_grad_enabled() and hidden.requires_grad))


class FusedForward:
    """The ``forward`` of one experts module: decode-sized calls through the fused kernel, the rest
    through the forward it replaced (``inner``)."""

    def __init__(self, module: nn.Module, devices: tuple[str, ...] = ("cuda",), max_terms: int = MAX_TERMS) -> None:
        why = unsupported(module)
        if why is not None:
            raise MoEKernelError(f"the fused MoE kernel cannot compute {type(module).__name__}: {why}")
        spec = gate_spec(module)
        assert spec is not None
        self.module = module
        self.spec = spec
        self.devices = devices
        self.max_terms = max_terms
        self.replaced = module.__dict__.get("forward")  # None: the class's forward; else QuantisedForward
        self.quantised = self.replaced if _is_quantised(self.replaced) else None
        self.calls = 0  # calls that took the fused kernel (eager calls, and each capture; not replays, not
        # compiled steps)

    def inner(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.replaced is not None:
            return self.replaced(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or not decode_sized(hidden_states, top_k_index, self.devices, self.max_terms):
            return self.inner(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        from swapmoe.kernels import fused_op  # one opaque operator: see that module for why

        if not torch.compiler.is_compiling():
            # not while dynamo traces: it would guard on the count and recompile the step at every call
            self.calls += 1
        ex = expert_tensors(self.module, self.spec, self.quantised)
        return fused_op.call(hidden_states, top_k_index, top_k_weights, ex, self.spec.act,
                             self.spec.alpha, self.spec.limit)


def install(module: nn.Module, devices: tuple[str, ...] = ("cuda",), max_terms: int = MAX_TERMS) -> FusedForward:
    """Make ``module``'s decode-sized calls run the fused kernel (idempotent; :func:`remove` undoes it)."""
    fwd = module.__dict__.get("forward")
    if isinstance(fwd, FusedForward):
        return fwd
    fused = FusedForward(module, devices, max_terms)
    module.forward = fused
    return fused


def remove(module: nn.Module) -> None:
    """Give ``module`` back the forward that :func:`install` replaced."""
    fwd = module.__dict__.get("forward")
    if not isinstance(fwd, FusedForward):
        return
    if fwd.replaced is not None:
        module.forward = fwd.replaced
    else:
        del module.forward


def use_fused_kernel(layers: Iterable[tuple[nn.Module, bool]], choice: str, device: torch.device) -> list[str]:
    """Install the fused kernel per ``choice`` (see the module docstring) on ``(experts module, swapmoe
    computes it)`` pairs; returns one line per MoE layer that keeps transformers' kernels and why
    (for the log). ``auto`` does nothing off CUDA or without Triton; ``triton`` raises without Triton."""
    check_moe_kernel(choice)
    if choice == "transformers":
        return []
    if not triton_available():
        if choice == "triton":
            raise MoEKernelError("--moe-kernel triton needs Triton (pip install triton, the version your torch "
                                 "pins); or use --moe-kernel transformers")
        return []
    if choice == "auto" and device.type != "cuda":
        return []
    skipped = []
    for i, (module, ours) in enumerate(layers):
        if choice == "auto" and not ours:
            continue
        why = unsupported(module)
        if why is not None:
            skipped.append(f"MoE layer {i}: {why}")
            continue
        install(module)
    return skipped


# ------------------------------------------------------------ transformers' ExpertsInterface (opt-in)
def fused_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """An experts implementation with transformers' signature: decode-sized CUDA calls through the fused
    kernel, any other call (or a module the kernel does not support) through grouped_mm."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    spec = self.__dict__.get("_swapmoe_gate_spec", False)
    if spec is False:  # decided once per module: probing the activation costs a few small CPU ops
        spec = gate_spec(self) if unsupported(self) is None else None
        self.__dict__["_swapmoe_gate_spec"] = spec
    if spec is None or not decode_sized(hidden_states, top_k_index, ("cuda",)):
        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](self, hidden_states, top_k_index, top_k_weights)
    from swapmoe.kernels import fused_op

    return fused_op.call(hidden_states, top_k_index, top_k_weights, expert_tensors(self, spec),
                         spec.act, spec.alpha, spec.limit)


def register_experts_implementation(name: str = REGISTERED_NAME) -> str:
    """Add :func:`fused_experts_forward` to transformers' (process-wide) ``ExpertsInterface`` as ``name``,
    for plain transformers models: ``model.set_experts_implementation(name)``. swapmoe itself never calls
    this (it installs :class:`FusedForward` per module instead)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(name, fused_experts_forward)
    return name
