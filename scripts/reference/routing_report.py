"""How the reference MoE routes held-out text: domain specialisation and temporal locality.

Usage::

    python scripts/reference/routing_report.py [models/ref-moe] [--heldout data/heldout] [--layers 0,3,7]

Reads each domain's held-out text (``data/heldout/<domain>.txt``) and the mixed stream
(``all.txt``) through the plain transformers model (no swapmoe runtime, every expert resident),
records the router's top-k choice for every token, and prints markdown tables:

* **domain x expert**: per layer, the share of each domain's top-k assignments that each expert
  receives (rows sum to 100%). Uniform routing would put 1/E in every cell.
* **specialisation**: per layer, the mutual information between domain and chosen expert (bits;
  0 = every domain routes alike) and the share of a domain's assignments that go to *its* 4 most
  used experts (uniform: 4/E).
* **temporal locality**: on the mixed stream, in order: how often a token's top-1 expert equals the
  previous token's, the mean overlap of consecutive top-k sets, and how much of the next 16 tokens'
  routing the S experts most used over the previous 64 tokens cover (what a resident set of S
  slots updated from recent history would serve). Each figure beside the same figure for the same
  tokens in shuffled order, which keeps every expert's load and removes the order.

T = tokens, E = experts, K = top-k, D = domains.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

DOMAINS = ("encyclopedia", "drama", "fairy_tale", "detective", "history", "medicine")
REPO = Path(__file__).resolve().parents[2]
HISTORY = 64  # tokens of recent routing that choose a resident set
HORIZON = 16  # tokens that resident set then serves (one update interval)


@torch.inference_mode()
def collect_routes(model, ids: list[int], window: int = 512) -> list[torch.Tensor]:
    """The router's top-k expert ids of every token, per MoE layer: a list of ``[T, K]`` tensors."""
    routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    chunks: list[list[torch.Tensor]] = [[] for _ in routers]

    def hook_for(i: int):
        def hook(module, args, output):
            chunks[i].append(output[2].detach().cpu())  # (logits [T,E], weights [T,K], indices [T,K])
        return hook

    handles = [r.register_forward_hook(hook_for(i)) for i, r in enumerate(routers)]
    device = next(model.parameters()).device
    try:
        x = torch.as_tensor(ids, dtype=torch.long, device=device)
        for start in range(0, x.numel(), window):
            model(input_ids=x[start : start + window].unsqueeze(0), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(c) for c in chunks]


def expert_shares(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E]`` share of the top-k assignments in ``indices [T, K]`` that each expert receives."""
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts).double()
    return counts / counts.sum()


def mutual_information(shares: torch.Tensor, weights: torch.Tensor) -> float:
    """I(domain; expert) in bits from per-domain shares ``[D, E]`` and domain weights ``[D]``."""
    joint = shares * (weights / weights.sum())[:, None]  # [D, E]
    p_e = joint.sum(0, keepdim=True)
    p_d = joint.sum(1, keepdim=True)
    mask = joint > 0
    return float((joint[mask] * torch.log2(joint[mask] / (p_d * p_e).expand_as(joint)[mask])).sum())


def locality(indices: torch.Tensor, num_experts: int, slots: int) -> dict[str, float]:
    """Temporal locality of one in-order ``[T, K]`` routing stream."""
    top1_same = float((indices[1:, 0] == indices[:-1, 0]).double().mean())
    one_hot = torch.zeros(indices.shape[0], num_experts, dtype=torch.bool)
    one_hot.scatter_(1, indices, True)  # [T, E]
    overlap = float((one_hot[1:] & one_hot[:-1]).sum(1).double().mean() / indices.shape[1])
    covered = total = 0
    counts = one_hot.double()
    for t in range(HISTORY, indices.shape[0] - HORIZON + 1, HORIZON):
        resident = torch.topk(counts[t - HISTORY : t].sum(0), slots).indices  # [S]
        nxt = indices[t : t + HORIZON]  # [HORIZON, K]
        covered += int(torch.isin(nxt, resident).sum())
        total += nxt.numel()
    return {"top1_same": top1_same, "topk_overlap": overlap, "coverage": covered / max(total, 1)}


def _pct(x: float) -> str:
    return f"{100 * x:.0f}"


def domain_table(shares: dict[str, torch.Tensor], layer: int, num_experts: int) -> list[str]:
    """Markdown: rows = domains, columns = experts, cells = % of the domain's assignments."""
    head = "| layer " + str(layer) + " | " + " | ".join(f"e{e}" for e in range(num_experts)) + " |"
    rows = [head, "|---" * (num_experts + 1) + "|"]
    for domain, s in shares.items():
        top = int(torch.argmax(s))
        cells = [f"**{_pct(v)}**" if e == top else _pct(v) for e, v in enumerate(s.tolist())]
        rows.append(f"| {domain} | " + " | ".join(cells) + " |")
    return rows


def report(model, tokenizer, heldout: Path, layers: list[int] | None = None, max_tokens: int = 16384,
           window: int = 512, seed: int = 0) -> str:
    """The markdown tables described in the module docstring."""
    cfg = model.config
    num_experts, k = cfg.num_experts, cfg.num_experts_per_tok
    by_domain: dict[str, list[torch.Tensor]] = {}
    for domain in DOMAINS:
        ids = tokenizer((heldout / f"{domain}.txt").read_text(encoding="utf-8"), add_special_tokens=False,
                        verbose=False)["input_ids"][:max_tokens]
        by_domain[domain] = collect_routes(model, ids, window)
    num_layers = len(next(iter(by_domain.values())))
    shown = layers if layers is not None else sorted({0, num_layers // 2, num_layers - 1})
    lines = [f"Held-out text, up to {max_tokens} tokens per domain; top-{k} of {num_experts} experts; "
             f"uniform routing = {100 / num_experts:.1f}% per expert.", ""]
    lines += ["Specialisation per MoE layer: mutual information between domain and expert (bits; "
              f"the most it could be is log2({len(DOMAINS)}) = {math.log2(len(DOMAINS)):.2f}), and the share of a "
              f"domain's assignments that its own 4 most used experts take (uniform: {400 / num_experts:.0f}%).", ""]
    lines += ["| layer | I(domain; expert) bits | top-4 share, mean over domains | min | max |",
              "|---|---|---|---|---|"]
    weights = torch.tensor([float(by_domain[d][0].shape[0]) for d in DOMAINS], dtype=torch.float64)
    all_shares = []
    for layer in range(num_layers):
        shares = torch.stack([expert_shares(by_domain[d][layer], num_experts) for d in DOMAINS])  # [D, E]
        all_shares.append(shares)
        top4 = torch.topk(shares, 4, dim=1).values.sum(1)
        lines.append(f"| {layer} | {mutual_information(shares, weights):.3f} | {_pct(float(top4.mean()))}% | "
                     f"{_pct(float(top4.min()))}% | {_pct(float(top4.max()))}% |")
    for layer in shown:
        lines += ["", f"Domain x expert, layer {layer} (% of the domain's top-{k} assignments; bold: its most used):", ""]
        lines += domain_table(dict(zip(DOMAINS, all_shares[layer], strict=True)), layer, num_experts)

    text = (heldout / "all.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][: max_tokens * 2]
    routes = collect_routes(model, ids, window)
    gen = torch.Generator().manual_seed(seed)
    slots = (num_experts // 2, num_experts // 4)
    lines += ["", f"Temporal locality on the mixed held-out stream (all.txt, first {len(ids)} tokens, in order) "
              "vs the same tokens shuffled. *same top-1*: a token's first expert equals the previous token's; "
              f"*top-{k} overlap*: mean share of a token's {k} experts that the previous token also chose; "
              f"*coverage S*: share of the next {HORIZON} tokens' choices that fall among the S experts most "
              f"used over the previous {HISTORY} tokens (a resident set of S of {num_experts} slots).", ""]
    head = ["layer", "same top-1", "shuffled", f"top-{k} overlap", "shuffled"]
    for s in slots:
        head += [f"coverage S={s}", "shuffled"]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for layer, idx in enumerate(routes):
        shuffled = idx[torch.randperm(idx.shape[0], generator=gen)]
        cells = []
        for s in slots:
            a, b = locality(idx, num_experts, s), locality(shuffled, num_experts, s)
            cells += [f"{_pct(a['coverage'])}%", f"{_pct(b['coverage'])}%"]
        a, b = locality(idx, num_experts, slots[0]), locality(shuffled, num_experts, slots[0])
        lines.append(f"| {layer} | {_pct(a['top1_same'])}% | {_pct(b['top1_same'])}% | {_pct(a['topk_overlap'])}% | "
                     f"{_pct(b['topk_overlap'])}% | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, default=REPO / "models" / "ref-moe")
    parser.add_argument("--heldout", type=Path, default=REPO / "data" / "heldout")
    parser.add_argument("--layers", default=None, help="comma-separated MoE layers to tabulate (default: first, middle, last)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="tokens per domain (twice this of all.txt)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    print(report(model, tok, args.heldout, layers, args.max_tokens), end="")


if __name__ == "__main__":
    main()
