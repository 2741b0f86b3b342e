"""Expert activation over a text stream: the heatmap and the locality figures behind SwapMoE.

The router's *unmasked* top-k choices are recorded for every token and MoE layer while the model
(all experts resident) reads the stream in order. From them:

* a heatmap per layer: windows of tokens down, experts across, colour = tokens routed;
* window-to-window repetition: the share of a window's ``k`` most used experts that are again
  among the next window's ``k`` most used;
* token-to-token repetition: the share of a token's top-k experts that the previous token also chose;
* the hit rate of an ideal cache of ``S`` slots (Belady's MIN: evict the expert needed furthest in
  the future), and of an LRU cache, for every ``S`` from ``k`` to ``E``: an upper bound on what any
  resident-set policy with ``S`` slots and exact routing could reach.

    N = tokens, K = top-k, E = experts, L = MoE layers
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from swapmoe.evaluation.perplexity import windows
from swapmoe.families import require_causal_lm
from swapmoe.routing import unpack_router_output


@torch.inference_mode()
def record_routing(model: Any, token_ids: Sequence[int], window: int = 256,
                   progress: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """Unmasked top-k expert ids per MoE layer: a list of ``[N', K]`` long tensors (N' scored inputs)."""
    require_causal_lm(model, "a routing trace of a text stream")
    runtime = model.swapmoe
    records: list[list[torch.Tensor]] = [[] for _ in runtime.layers]
    handles = []
    for i, st in enumerate(runtime.layers):
        def hook(module: torch.nn.Module, args: tuple, output: Any, i: int = i, e: int = st.layer.num_experts) -> None:
            records[i].append(unpack_router_output(output, e)[2].detach().cpu())
        handles.append(st.layer.router.register_forward_hook(hook))
    device = next(model.parameters()).device
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    try:
        for a, b in windows(ids.numel(), window):
            model(input_ids=ids[a:b].unsqueeze(0).to(device), use_cache=False)
            if progress is not None:
                progress(b - a)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(r).reshape(-1, r[0].shape[-1]) for r in records]


def activation_counts(indices: torch.Tensor, num_experts: int, window: int) -> torch.Tensor:
    """``[N/window, E]`` tokens routed to each expert in each window of ``window`` tokens."""
    n = indices.shape[0] // window * window
    rows = indices[:n].reshape(-1, window * indices.shape[1])  # [W, window*K]
    counts = torch.zeros(rows.shape[0], num_experts, dtype=torch.long)
    counts.scatter_add_(1, rows, torch.ones_like(rows))
    return counts


def window_repeat(counts: torch.Tensor, k: int) -> float:
    """Mean share of a window's ``k`` most used experts that are also the next window's."""
    top = counts.topk(k, dim=1).indices  # [W, k]
    if top.shape[0] < 2:
        return float("nan")
    same = [len(set(top[i].tolist()) & set(top[i + 1].tolist())) / k for i in range(top.shape[0] - 1)]
    return sum(same) / len(same)


def token_repeat(indices: torch.Tensor) -> float:
    """Mean share of a token's top-k experts that the previous token also chose."""
    if indices.shape[0] < 2:
        return float("nan")
    prev, cur = indices[:-1], indices[1:]  # [N-1, K]
    shared = (cur.unsqueeze(-1) == prev.unsqueeze(-2)).any(-1).float()  # [N-1, K]
    return float(shared.mean())


def belady_hit_rate(requests: Sequence[int], slots: int) -> float:
    """Hit rate of the optimal offline cache (evict the item needed furthest in the future)."""
    n = len(requests)
    nxt = [n] * n
    last: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        nxt[i] = last.get(requests[i], n)
        last[requests[i]] = i
    cache: dict[int, int] = {}  # expert -> its next use
    hits = 0
    for i, e in enumerate(requests):
        if e in cache:
            hits += 1
        elif len(cache) >= slots:
            victim = max(cache, key=cache.__getitem__)
            del cache[victim]
        cache[e] = nxt[i]
    return hits / n if n else float("nan")


def lru_hit_rate(requests: Sequence[int], slots: int) -> float:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for e in requests:
        if e in cache:
            hits += 1
            cache.move_to_end(e)
        else:
            if len(cache) >= slots:
                cache.popitem(last=False)
            cache[e] = None
    return hits / len(requests) if requests else float("nan")


def locality_stats(indices: torch.Tensor, num_experts: int, window: int) -> dict[str, Any]:
    """Every locality figure of one layer (see the module docstring)."""
    k = indices.shape[1]
    requests = indices.reshape(-1).tolist()  # the k choices of each token, in order
    counts = activation_counts(indices, num_experts, window)
    sizes = sorted({s for s in (k, 2 * k, num_experts // 4, num_experts // 2, 3 * num_experts // 4, num_experts)
                    if k <= s <= num_experts})
    return {
        "tokens": indices.shape[0],
        "top_k": k,
        "experts": num_experts,
        "window_topk_repeat": window_repeat(counts, k),
        "token_repeat": token_repeat(indices),
        "ideal_cache_hit_rate": {s: belady_hit_rate(requests, s) for s in sizes},
        "lru_cache_hit_rate": {s: lru_hit_rate(requests, s) for s in sizes},
    }


def heatmap(counts_by_layer: dict[int, torch.Tensor], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(counts_by_layer)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 6), dpi=120, squeeze=False)
    for ax, (layer, counts) in zip(axes[0], counts_by_layer.items(), strict=True):
        im = ax.imshow(counts.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("expert")
        ax.set_ylabel("window of tokens (stream order)")
        fig.colorbar(im, ax=ax, fraction=0.046, label="tokens routed")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
