"""Train the reference tokenizer, MoE model and dense twin from scratch; write both model directories.

Usage (the GPU machine, one command, about 3 minutes on one H200)::

    python scripts/reference/train.py --data ../shared/data --out models

(The shipped models were made on the GPU machine, which cannot see ``../shared/data``: the text
was copied into the git-ignored ``.carry/data`` and the command run as ``--data .carry/data``.)

Quick check on a CPU (a few steps; the result is a working but untrained model)::

    python scripts/reference/train.py --out /tmp/ref --steps 4 --batch-size 2 --context 64 \
        --eval-every 2 --warmup 2 --eval-tokens 1024 --device cpu

What it does, in order, everything seeded (``--seed``):

1. Splits ``--data`` into training, validation and held-out documents (``split_data.py``: whole
   documents, a fixed hash rule) and checks that the held-out text equals ``data/heldout``.
2. Trains the byte-level BPE tokenizer on the training documents (``bpe.py``).
3. Trains the Qwen3-MoE (``architecture.py``: 8 layers x 16 experts, top-2) with the router's
   per-layer load-balancing loss, then the dense Qwen3 twin with the same active parameters, on the same
   token stream, the same batches in the same order and the same schedule. Each keeps the step
   with the lowest validation loss.
4. Stores each model in bfloat16 as an ordinary Hugging Face directory (config, generation
   config, safetensors shards under 15 MB, tokenizer), measures held-out perplexity on the stored
   weights (``swapmoe.evaluation.stream_perplexity``: the stream read in order in 512-token
   windows, float32 compute), tabulates the MoE's routing (``routing_report.py``), and writes
   ``README.md`` (the model card) and ``eval_results.json`` into each directory.

GPU bit-exactness is not promised (cuBLAS and atomics may reorder sums), so a rerun gives the
same tokenizer and data order but perplexities that can differ in the last digits.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO / "src")]  # scripts/reference modules; swapmoe without installing

import architecture as arch  # noqa: E402
from bpe import EOS, to_transformers, train_bpe  # noqa: E402
from card import write_card  # noqa: E402
from corpus import DOMAINS  # noqa: E402
from routing_report import report as routing_report  # noqa: E402
from split_data import Split, default_data_dir, join, make_split, mixed_stream  # noqa: E402

from swapmoe.evaluation import stream_perplexity  # noqa: E402

MAX_SHARD = "12MB"  # under the 15 MB per-file limit of the repository
EVAL_WINDOW = 512  # held-out perplexity window: the training context
TEST_SLICE_TOKENS = 4096  # the slice of all.txt that tests/evaluation checks against this card


@dataclass
class TrainArgs:
    steps: int = 1500  # 2400 overfit: valid loss bottomed at step 1200 and the MoE fell to the dense level
    batch_size: int = 32
    context: int = 512
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    dropout: float = 0.2  # 0.1 overfit after ~1100 steps (valid 4.12 nats); 0.2 reached 4.07 in 1500
    grad_clip: float = 1.0
    eval_every: int = 100
    seed: int = 0
    experts_implementation: str = "grouped_mm"
    max_minutes: float = 3.5  # safety net per model so that the whole command stays within 10 minutes


@dataclass
class TrainLog:
    steps_done: int = 0
    best_step: int = 0
    best_valid_loss: float = float("inf")
    seconds: float = 0.0
    stopped_by_time: bool = False
    curve: list[dict] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def token_stream(tok, docs: list[str]) -> torch.Tensor:
    """Documents as one ``[N]`` stream, each followed by the end-of-text token."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, a: TrainArgs) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    progress = (step - a.warmup) / max(a.steps - a.warmup, 1)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_offsets(num_tokens: int, a: TrainArgs) -> torch.Tensor:
    """``[steps, B]`` random window starts: drawn once, so both models see the same batches."""
    gen = torch.Generator().manual_seed(a.seed)
    return torch.randint(0, num_tokens - a.context - 1, (a.steps, a.batch_size), generator=gen)


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-Transformer load balancing, per MoE layer: ``[L]`` of ``E * sum_e f_e * P_e``.

    ``f_e`` is the share of the layer's top-k assignments that go to expert ``e`` and ``P_e`` its mean
    router probability, both within one layer; 1.0 is perfectly even. (transformers'
    ``load_balancing_loss_func`` pools ``f`` and ``P`` over all layers before the product, so it only
    evens out expert *numbers* across layers: with it, held-out routing left some experts of every
    layer unused while its value sat at its balanced minimum.)
    """
    per_layer = []
    for logits in router_logits:  # [T, E] each
        probs = logits.float().softmax(-1)
        top = probs.topk(top_k, dim=-1).indices  # [T, K]
        counts = torch.zeros_like(probs[0]).scatter_add_(0, top.flatten(), torch.ones_like(top.flatten(), dtype=probs.dtype))
        per_layer.append(probs.shape[-1] * (counts / top.numel() * probs.mean(0)).sum())
    return torch.stack(per_layer)


def lm_loss(model, x: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of ``x [B, L+1]`` and, for the MoE, the per-layer balance ``[L]``."""
    kw = {"output_router_logits": True} if with_aux else {}
    out = model(input_ids=x[:, :-1], use_cache=False, **kw)
    ce = F.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten())
    if not with_aux:
        return ce, torch.zeros(1, device=x.device)
    return ce, balance_loss(out.router_logits, model.config.num_experts_per_tok)


@torch.no_grad()
def valid_loss(model, valid: torch.Tensor, a: TrainArgs, device: torch.device) -> float:
    """Mean cross-entropy over non-overlapping windows of the validation stream."""
    model.eval()
    n = (valid.numel() - 1) // a.context
    xs = torch.stack([valid[i * a.context : (i + 1) * a.context + 1] for i in range(n)]).to(device)
    total = 0.0
    for chunk in xs.split(a.batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            ce, _ = lm_loss(model, chunk, with_aux=False)
        total += float(ce) * chunk.shape[0]
    model.train()
    return total / n


def train_model(model, train: torch.Tensor, valid: torch.Tensor, a: TrainArgs, device: torch.device,
                is_moe: bool, log_prefix: str) -> TrainLog:
    """AdamW on random windows of ``train``; returns the log and leaves the best weights in ``model``."""
    model.to(device).train()
    hooks = arch.add_residual_dropout(model, a.dropout)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    offsets = batch_offsets(train.numel(), a)
    span = torch.arange(a.context + 1)
    train_dev = train.to(device)
    log = TrainLog()
    best_state = None
    coef = arch.ROUTER_AUX_LOSS_COEF if is_moe else 0.0
    start = time.perf_counter()
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        x = train_dev[(offsets[step][:, None] + span).to(device)]  # [B, L+1]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            ce, aux = lm_loss(model, x, with_aux=is_moe)
        loss = ce + coef * aux.sum()  # Switch: the coefficient applies to every layer's term
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        log.steps_done = step + 1
        last = step + 1 == a.steps
        over_time = time.perf_counter() - start > 60 * a.max_minutes
        if (step + 1) % a.eval_every == 0 or last or over_time:
            v = valid_loss(model, valid, a, device)
            entry = {"step": step + 1, "train_loss": round(ce.item(), 4), "balance": round(aux.mean().item(), 4),
                     "valid_loss": round(v, 4), "seconds": round(time.perf_counter() - start, 1)}
            log.curve.append(entry)
            print(f"{log_prefix} {json.dumps(entry)}", flush=True)
            if v < log.best_valid_loss:
                log.best_valid_loss, log.best_step = v, step + 1
                best_state = {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()}
        if over_time:
            log.stopped_by_time = True
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    log.seconds = time.perf_counter() - start
    for h in hooks:
        h.remove()
    if best_state is not None:
        model.load_state_dict(best_state)
    return log


def save_model(model, tokenizer, out: Path) -> None:
    """bfloat16 safetensors shards, config, generation config and tokenizer: an ordinary HF directory."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")):
        old.unlink()
    model.config.use_cache = True
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id, do_sample=False, max_new_tokens=128,
    )
    model.to(arch.STORAGE_DTYPE).save_pretrained(out, max_shard_size=MAX_SHARD)
    tokenizer.save_pretrained(out)


@torch.no_grad()
def evaluate(out: Path, tokenizer, heldout: dict[str, str], device: torch.device, max_tokens: int | None) -> dict:
    """Held-out perplexity of the *stored* model (bf16 weights), float32 compute, TF32 off."""
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device).eval()
    results: dict = {"window": EVAL_WINDOW, "compute_dtype": "float32", "weights_dtype": "bfloat16", "files": {}}
    for name, text in heldout.items():
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
        r = stream_perplexity(model, ids, EVAL_WINDOW)
        results["files"][name] = {"perplexity": round(r.perplexity, 3), "tokens": r.tokens}
        if name == "all.txt":
            s = stream_perplexity(model, ids[:TEST_SLICE_TOKENS], EVAL_WINDOW)
            results["test_slice"] = {"file": "data/heldout/all.txt", "first_tokens": TEST_SLICE_TOKENS,
                                     "perplexity": round(s.perplexity, 3), "tokens": s.tokens}
            bf = stream_perplexity(model.to(torch.bfloat16), ids, EVAL_WINDOW)
            results["all_bfloat16_compute"] = round(bf.perplexity, 3)
            model.float()
    results["perplexity"] = results["files"]["all.txt"]["perplexity"]
    return results


def check_heldout(split: Split, heldout_dir: Path) -> dict[str, str]:
    """The held-out texts this split gives, checked byte for byte against the repository's copy."""
    texts = {f"{d}.txt": join(split.heldout[d]) for d in DOMAINS}
    texts = {"all.txt": join(mixed_stream(split.heldout)), **texts}
    for name, text in texts.items():
        path = heldout_dir / name
        if path.is_file() and path.read_bytes() != text.encode("utf-8"):
            raise SystemExit(f"{path} differs from the split of this data: run split_data.py first")
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=default_data_dir(), help="the shared data directory")
    parser.add_argument("--out", type=Path, default=REPO / "models", help="writes ref-moe/ and ref-dense/ here")
    parser.add_argument("--heldout", type=Path, default=REPO / "data" / "heldout")
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--only", choices=["moe", "dense"], default=None, help="train one of the two")
    parser.add_argument("--eval-tokens", type=int, default=None, help="score only this many held-out tokens per "
                        "file, and route this many per domain (quick checks; default: all, and 16384)")
    for f in TrainArgs.__dataclass_fields__.values():
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    a = TrainArgs(**{k: getattr(args, k) for k in TrainArgs.__dataclass_fields__})
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = True  # training only; evaluation turns it off
    torch.set_flush_denormal(True)  # x86 CPUs run ~10x slower on subnormal activations

    split = make_split(args.data)
    heldout = check_heldout(split, args.heldout)
    train_docs = [d.text for docs in split.train.values() for d in docs]
    valid_docs = [d.text for docs in split.valid.values() for d in docs]
    bpe = train_bpe(train_docs)
    tokenizer = to_transformers(bpe, model_max_length=arch.SHAPE["max_position_embeddings"])
    train, valid = token_stream(bpe, train_docs), token_stream(bpe, valid_docs)
    eos = bpe.token_to_id(EOS)
    print(f"tokenizer: {bpe.get_vocab_size()} tokens; train {train.numel()} tokens, valid {valid.numel()}; "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    data = {"train_tokens": train.numel(), "valid_tokens": valid.numel(),
            "split": {d: {part: {"documents": len(getattr(split, part)[d]),
                                 "chars": sum(len(x.text) for x in getattr(split, part)[d])}
                          for part in ("train", "valid", "heldout")} for d in DOMAINS}}

    from transformers import AutoModelForCausalLM

    runs = {"moe": ("ref-moe", arch.moe_config), "dense": ("ref-dense", arch.dense_config)}
    results = {}
    for kind, (name, make_config) in runs.items():
        if args.only and kind != args.only:
            continue
        seed_everything(a.seed)
        model = AutoModelForCausalLM.from_config(make_config(bpe.get_vocab_size(), eos), dtype=torch.float32)
        if kind == "moe" and hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation(a.experts_implementation)
        counts = arch.parameter_counts(model)
        print(f"{name}: {counts}", flush=True)
        log = train_model(model, train, valid, a, device, kind == "moe", name)
        out = args.out / name
        save_model(model.cpu(), tokenizer, out)
        ev = evaluate(out, tokenizer, heldout, device, args.eval_tokens)
        print(f"{name}: held-out perplexity {ev['perplexity']} ({log.seconds:.0f}s training)", flush=True)
        results[kind] = {"name": name, "out": out, "counts": counts, "log": log, "eval": ev}

    routing = None
    if "moe" in results:
        moe = AutoModelForCausalLM.from_pretrained(results["moe"]["out"], dtype=torch.float32).to(device).eval()
        with torch.no_grad():
            routing = routing_report(moe, tokenizer, args.heldout, max_tokens=args.eval_tokens or 16384)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "python": platform.python_version(),
           "transformers": __import__("transformers").__version__,
           "tokenizers": __import__("tokenizers").__version__,
           "command_seconds": round(time.perf_counter() - t0, 1),
           "command": "python scripts/reference/train.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    for kind, r in results.items():
        record = {"model": r["name"], "parameters": r["counts"], "train_args": asdict(a), "data": data,
                  "training": {k: v for k, v in asdict(r["log"]).items()}, "heldout": r["eval"], "environment": env}
        (r["out"] / "eval_results.json").write_text(json.dumps(record, indent=1) + "\n")
        write_card(r["out"], record, {k: v["eval"] for k, v in results.items()},
                   {k: v["counts"] for k, v in results.items()}, routing if kind == "moe" else None)
    print(f"done in {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
