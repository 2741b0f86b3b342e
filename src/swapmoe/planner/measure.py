"""The measurements a profile is made of (planner/profile.py decides which runs; this measures one).

* :func:`reference_logprobs` and :func:`score`: the calibration stream read in windows (batch 1, in
  order), against the full model's log-probabilities: KL per token, NLL, top-1 agreement, hit rate;
* :func:`decode_steps`: teacher-forced decode steps through the package's one decode timing;
* :func:`time_layers`, :func:`time_formats`, :func:`time_updates`: per-layer medians at batch 1 (an
  expert, the MoE block at decode and prefill, each format's block against the base block in
  alternating rounds, a copy, the policy step, a whole update).

    N = calibration tokens, W = window, V = vocabulary, L = MoE layers
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from swapmoe.evaluation.perplexity import windows

STALL = 3.0  # a decode step slower than this many medians is counted as stalled and left out
WARMUP_STEPS = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def reference_logprobs(model: Any, ids: torch.Tensor, window: int) -> tuple[list[torch.Tensor], float]:
    """Full-model log-probabilities per window (host, float32) and the full model's mean NLL."""
    device = next(model.parameters()).device
    out, nll, n = [], 0.0, 0
    for a, b in windows(ids.numel(), window):
        logits = model(input_ids=ids[a:b].unsqueeze(0).to(device), use_cache=False).logits[0].float()
        logp = F.log_softmax(logits, dim=-1).cpu()  # [W, V]
        nll -= float(logp.gather(1, ids[a + 1 : b + 1].unsqueeze(1)).sum())
        n += b - a
        out.append(logp)
    return out, nll / n


@torch.inference_mode()
def score(model: Any, ids: torch.Tensor, window: int, ref: Sequence[torch.Tensor]) -> dict[str, Any]:
    """KL(full || model), NLL, top-1 agreement and prefill time over the stream, in windows."""
    device = next(model.parameters()).device
    runtime = model.swapmoe
    before = runtime.stats()["total"]
    kl = nll = 0.0
    agree = n = 0
    prefill = 0.0
    for w, (a, b) in enumerate(windows(ids.numel(), window)):
        inputs = ids[a:b].unsqueeze(0).to(device)  # [1, W]
        _sync(device)
        t0 = time.perf_counter()
        logits = model(input_ids=inputs, use_cache=False).logits[0].float()  # [W, V]
        _sync(device)
        prefill += time.perf_counter() - t0
        logq = F.log_softmax(logits, dim=-1).cpu()
        logp = ref[w]
        nll -= float(logq.gather(1, ids[a + 1 : b + 1].unsqueeze(1)).sum())
        kl += float((logp.exp() * (logp - logq)).sum())
        agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
        n += b - a
    after = runtime.stats()["total"]
    lookups = after["lookups"] - before["lookups"]
    return {"kl": max(kl / n, 0.0), "nll": nll / n, "top1": agree / n,
            "hit_rate": (after["hits"] - before["hits"]) / lookups if lookups else None,
            "swaps": after["swaps"] - before["swaps"], "tokens": n, "prefill_s_per_token": prefill / n}


@torch.inference_mode()
def decode_steps(model: Any, ids: torch.Tensor, steps: int) -> dict[str, float]:
    """Teacher-forced decode steps with a KV cache: seconds per token (mean over the steps that were
    not stalled) and swaps per token per virtualised layer."""
    from swapmoe.engine.timing import time_decode

    runtime = model.swapmoe
    steps = max(1, min(steps, ids.numel() - 1 - WARMUP_STEPS))
    # untimed warm-up steps pay one-off costs (graph capture, kernel selection on CUDA)
    before = runtime.stats()["total"]["swaps"]
    tokens = ids.tolist()
    times = time_decode(model, tokens[:1], steps, feed=tokens[1:], warmup=WARMUP_STEPS).step_s
    # A step slower than STALL x the median was stalled by something else on the machine (another
    # process on a shared CPU); an update's own cost is far below that on CPU and CUDA alike.
    cut = STALL * statistics.median(times)
    kept = [t for t in times if t <= cut]
    seconds = sum(kept) / len(kept)
    virtual = sum(1 for st in runtime.layers if st.pool is not None)
    swaps = runtime.stats()["total"]["swaps"] - before
    fed = 1 + WARMUP_STEPS + steps  # every token the runtime saw since `before`
    return {"decode_s_per_token": seconds, "decode_swaps_per_token": swaps / fed / virtual if virtual else 0.0,
            "decode_stalled_steps": len(times) - len(kept)}


@torch.inference_mode()
def time_layers(model: Any, window: int, repeats: int) -> dict[str, list[float]]:
    """Compute time per MoE layer of the full model at batch 1: one expert, the block at decode
    and at prefill (per token)."""
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    hidden = model.config.hidden_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    out: dict[str, list[float]] = {"expert_compute_s": [], "layer_decode_s": [], "layer_prefill_s_per_token": []}
    for st in model.swapmoe.layers:
        la = st.layer
        x1 = torch.randn(1, hidden, generator=gen).to(device, dtype)  # [1, H]
        idx = torch.zeros(1, 1, dtype=torch.long, device=device)  # [1, 1]: expert 0
        w = torch.ones(1, 1, dtype=dtype, device=device)
        out["expert_compute_s"].append(_median_time(lambda la=la, x1=x1, idx=idx, w=w: la.experts(x1, idx, w),
                                                    device, repeats))
        xd = x1.view(1, 1, hidden)
        out["layer_decode_s"].append(_median_time(lambda la=la, xd=xd: la.block(xd), device, repeats))
        xp = torch.randn(1, window, hidden, generator=gen).to(device, dtype)
        reps = max(3, repeats // 4)
        out["layer_prefill_s_per_token"].append(_median_time(lambda la=la, xp=xp: la.block(xp), device, reps) / window)
    return out


@torch.inference_mode()
def time_formats(model: Any, others: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """Per format: the MoE block's decode time per layer (1 token, batch 1) with its experts held in
    that format, *minus* the same block of ``model`` (the base), timed in alternating rounds so that
    a shared machine's drift falls on both alike (medians of ``repeats`` rounds)."""
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    gen = torch.Generator(device="cpu").manual_seed(0)
    out: dict[str, list[float]] = {}
    for fmt, other in others.items():
        deltas = []
        for base_st, st in zip(model.swapmoe.layers, other.swapmoe.layers, strict=True):
            x = torch.randn(1, 1, model.config.hidden_size, generator=gen).to(device, dtype)  # [1, 1, H]
            ta, tb = [], []
            base_st.layer.block(x)  # warm-up
            st.layer.block(x)
            for _ in range(repeats):
                for fn, acc in ((base_st.layer.block, ta), (st.layer.block, tb)):
                    _sync(device)
                    t0 = time.perf_counter()
                    fn(x)
                    _sync(device)
                    acc.append(time.perf_counter() - t0)
            deltas.append(statistics.median(tb) - statistics.median(ta))
        out[fmt] = deltas
    return out


def _time_layer_updates(st: Any, swappers: tuple[Any, Any], device: torch.device, repeats: int) -> dict[str, float]:
    from swapmoe.policy import Swap, plan_swaps

    sync, asyn = swappers
    pool = st.pool
    slot, old = 0, pool.expert_in[0]
    new = next(e for e in range(st.layer.num_experts) if not bool(pool.resident[e]))
    views = pool.views(slot)
    t = _median_time(lambda: pool.store.copy_into(views, new, non_blocking=pool.store.pinned), device, repeats)
    pool.store.copy_into(views, old, non_blocking=False)  # the slot holds its own expert again
    scores = [float(i) for i in range(st.layer.num_experts)]

    def policy() -> None:
        st.importance.tolist()
        plan_swaps(scores, pool.expert_in, 1)

    pair = [old, new]

    def one_update(swapper: Any, wait: bool = True) -> None:
        policy()
        swapper.submit(pool, [Swap(slot, pair[0], pair[1])])
        if wait:
            swapper.poll(pool, wait=True)
        pair.reverse()

    row = {"transfer_s": t, "transfer_bytes_per_s": pool.store.expert_bytes() / t if t > 0 else float("inf"),
           "policy_s": _median_time(policy, device, repeats),
           "update_s": _median_time(lambda: one_update(sync), device, repeats)}
    if asyn.asynchronous:
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            one_update(asyn, wait=False)
            times.append(time.perf_counter() - t0)  # host time: what the compute path pays
            asyn.poll(pool, wait=True)
        row["update_submit_s"] = statistics.median(times)
    else:
        row["update_submit_s"] = row["update_s"]
    if pool.expert_in[slot] != old:  # leave the resident set as it was
        sync.submit(pool, [Swap(slot, pool.expert_in[slot], old)])
    return row


def time_updates(model: Any, repeats: int) -> dict[str, Any]:
    """Copy and update costs per MoE layer, on a model whose layers are all virtualised."""
    from swapmoe.pool import Swapper

    runtime = model.swapmoe
    device = runtime.device
    keys = ("transfer_s", "transfer_bytes_per_s", "policy_s", "update_s", "update_submit_s")
    out: dict[str, Any] = {k: [] for k in keys}
    swappers = (Swapper(device, asynchronous=False), Swapper(device, asynchronous=True))
    out["pinned"] = device.type == "cuda"
    out["async_swaps"] = swappers[1].asynchronous and runtime.config.async_swaps
    for st in runtime.layers:
        row = _time_layer_updates(st, swappers, device, repeats) if st.pool is not None else dict.fromkeys(keys, 0.0)
        for k in keys:
            out[k].append(row[k])
    return out
