"""One policy over one text stream, against the full model: accuracy, latency and memory.

The stream is read in order, batch 1, in fixed windows (as :mod:`swapmoe.evaluation.perplexity`),
so the resident set carries over from window to window as in continuous serving. For every scored
token we compare the policy's next-token distribution ``q`` with the full model's ``p``:

* perplexity of the policy on the text;
* top-1 agreement: share of positions where ``argmax q == argmax p``;
* mean KL divergence ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` in nats.

Latency is measured twice: prefill (window forwards, seconds per token) and decode (teacher-forced
single-token steps with a KV cache over a slice of the same text, seconds per token), both with
device synchronisation. Memory: expert slots (summed from the slot tensors), other weights on the
device, and, on CUDA, the peak allocated during the run; the rest of the peak is KV cache and
activations.

    N = tokens in the stream, W = window, V = vocabulary
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from swapmoe.evaluation.perplexity import runtime_counters, windows


@dataclass(frozen=True)
class EvalResult:
    perplexity: float
    nll: float
    tokens: int
    top1_agreement: float | None  # None without a reference
    kl: float | None
    prefill_s_per_token: float
    decode_s_per_token: float | None
    decode_tokens: int
    expert_bytes: int  # device bytes of expert weights (slots, or every expert when not virtualised)
    other_bytes: int  # device bytes of every other weight
    peak_bytes: int | None  # CUDA peak allocated over the run; None on CPU
    hit_rate: float | None
    swaps: int | None
    bytes_copied: int | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(model: Any) -> tuple[int, int]:
    """(expert bytes, other bytes) held on the model's device, from the tensors themselves.

    For a model without a swapmoe runtime (the dense twin, accelerate offloading) parameters whose
    name contains ``.experts.`` count as experts; offloaded (meta or CPU) parameters count nowhere.
    """
    device = next(model.parameters()).device
    runtime = getattr(model, "swapmoe", None)
    seen: set[int] = set()
    experts = other = 0
    expert_ids: set[int] = set()
    if runtime is not None:
        for st in runtime.layers:
            tensors = st.pool.slots.values() if st.pool is not None else [
                getattr(st.layer.experts, n) for n in st.layer.expert_param_names]
            for t in tensors:
                expert_ids.add(t.data_ptr())
            experts += st.resident_bytes()
    for name, p in model.named_parameters(remove_duplicate=True):
        if p.device != device or id(p) in seen:
            continue
        seen.add(id(p))
        size = p.numel() * p.element_size()
        if runtime is not None:
            if p.data_ptr() not in expert_ids:
                other += size
        elif ".experts." in name:
            experts += size
        else:
            other += size
    return experts, other


@torch.inference_mode()
def evaluate_stream(
    model: Any,
    token_ids: Sequence[int] | torch.Tensor,
    reference: Any | None = None,
    window: int = 256,
    decode_tokens: int = 64,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Evaluate ``model`` on one token stream; ``reference`` (the full model) gives agreement and KL."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)  # [N]
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens to score one")
    ref_device = next(reference.parameters()).device if reference is not None else None
    experts, other = weight_bytes(model)
    foreign = 0
    if device.type == "cuda":
        # the peak is this model's: memory held by anything else (the reference model) is subtracted
        foreign = max(torch.cuda.memory_allocated(device) - experts - other, 0)
        torch.cuda.reset_peak_memory_stats(device)
    before = runtime_counters(model)
    # accumulated on the device: no host sync per window
    nll = torch.zeros((), dtype=torch.float64, device=device)
    kl = torch.zeros((), dtype=torch.float64, device=device)
    agree = torch.zeros((), dtype=torch.long, device=device)
    scored = 0
    prefill_s = 0.0
    timed = 0  # tokens whose window was timed: the first window also warms kernels up, so it is not
    start = time.perf_counter()
    for a, b in windows(ids.numel(), window):
        inputs = ids[a:b].unsqueeze(0).to(device)  # [1, W]
        targets = ids[a + 1 : b + 1].to(device)  # [W]
        _sync(device)
        t0 = time.perf_counter()
        logits = model(input_ids=inputs, use_cache=False).logits[0].float()  # [W, V]
        _sync(device)
        if a > 0:
            prefill_s += time.perf_counter() - t0
            timed += targets.numel()
        logq = F.log_softmax(logits, dim=-1)  # [W, V]
        nll += -logq.gather(1, targets.unsqueeze(1)).sum().double()
        if reference is not None:
            ref_logits = reference(input_ids=inputs.to(ref_device), use_cache=False).logits[0].float()
            logp = F.log_softmax(ref_logits, dim=-1).to(device)  # [W, V]
            kl += (logp.exp() * (logp - logq)).sum().double()
            agree += (logp.argmax(-1) == logq.argmax(-1)).sum()
        scored += targets.numel()
        if progress is not None:
            progress(targets.numel())
    after = runtime_counters(model)
    decode_s = _decode_latency(model, ids, decode_tokens) if decode_tokens > 0 else None
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - foreign if device.type == "cuda" else None
    hit_rate = swaps = copied = None
    if before is not None and after is not None:
        lookups = after[1] - before[1]
        hit_rate = (after[0] - before[0]) / lookups if lookups else None
        swaps, copied = after[2] - before[2], after[3] - before[3]
    mean_nll = float(nll) / scored
    return EvalResult(
        perplexity=math.exp(mean_nll), nll=mean_nll, tokens=scored,
        top1_agreement=int(agree) / scored if reference is not None else None,
        kl=float(kl) / scored if reference is not None else None,
        prefill_s_per_token=prefill_s / timed if timed else float("nan"), decode_s_per_token=decode_s,
        decode_tokens=decode_tokens if decode_s is not None else 0,
        expert_bytes=experts, other_bytes=other, peak_bytes=peak,
        hit_rate=hit_rate, swaps=swaps, bytes_copied=copied, seconds=seconds,
    )


def _decode_latency(model: Any, ids: torch.Tensor, steps: int) -> float:
    """Seconds per teacher-forced decode step over the first tokens of the stream, through the one
    decode path (swapmoe.engine.timing; a CUDA graph replay per step where the model allows it)."""
    from swapmoe.engine.timing import time_decode

    warmup = 3  # untimed: the first steps capture the graph and select kernels
    steps = min(steps, ids.numel() - 1 - warmup)
    if steps < 1:
        return float("nan")
    tokens = ids.tolist()
    return time_decode(model, tokens[:1], steps, feed=tokens[1:], warmup=warmup).mean_s
