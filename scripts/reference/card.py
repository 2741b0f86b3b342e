"""The model card (``README.md``) of a reference model, written by ``train.py`` from its measurements."""

from __future__ import annotations

from pathlib import Path

from corpus import DOMAINS

TITLES = {"ref-moe": "swapmoe reference MoE (Qwen3-MoE, 16 experts x 8 layers, top-2)",
          "ref-dense": "swapmoe reference dense twin (Qwen3, same active parameters as ref-moe)"}


def _m(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def _disk(out: Path) -> str:
    files = sorted(out.glob("*.safetensors"))
    sizes = ", ".join(f"{f.name} {f.stat().st_size / 1e6:.1f} MB" for f in files)
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return f"{total / 1e6:.1f} MB in all ({sizes})"


def _split_table(split: dict) -> list[str]:
    rows = ["| domain | source | train docs / chars | valid docs / chars | held-out docs / chars |",
            "|---|---|---|---|---|"]
    source = {"encyclopedia": "WikiText-2 valid.txt (articles)", "drama": "tinyshakespeare (ranges of ~16 kB of speeches)",
              "fairy_tale": "Grimm's Fairy Tales (tales)", "detective": "Adventures of Sherlock Holmes (adventures)",
              "history": "History of the United States (chapters)", "medicine": "Manual of Surgery (chapters)"}
    for d in DOMAINS:
        cells = [f"{split[d][p]['documents']} / {split[d][p]['chars']:,}" for p in ("train", "valid", "heldout")]
        rows.append(f"| {d} | {source[d]} | " + " | ".join(cells) + " |")
    return rows


def _ppl_table(evals: dict, counts: dict) -> list[str]:
    names = {"moe": "ref-moe", "dense": "ref-dense"}
    kinds = [k for k in ("moe", "dense") if k in evals]
    rows = ["| held-out text | tokens | " + " | ".join(f"{names[k]} ppl" for k in kinds) + " |",
            "|---" * (2 + len(kinds)) + "|"]
    first = evals[kinds[0]]
    for fname, r in first["files"].items():
        cells = [f"{evals[k]['files'][fname]['perplexity']:.2f}" for k in kinds]
        label = "**all.txt (mixed stream)**" if fname == "all.txt" else fname
        rows.append(f"| {label} | {r['tokens']:,} | " + " | ".join(cells) + " |")
    cells = [f"{evals[k]['all_bfloat16_compute']:.2f}" for k in kinds]
    rows.append("| all.txt, bfloat16 compute | | " + " | ".join(cells) + " |")
    ts = first["test_slice"]
    cells = [f"{evals[k]['test_slice']['perplexity']:.2f}" for k in kinds]
    rows.append(f"| first {ts['first_tokens']:,} tokens of all.txt (the CPU test's slice) | {ts['tokens']:,} | "
                + " | ".join(cells) + " |")
    rows.append("| parameters: total / active per token | | " + " | ".join(
        f"{_m(counts[k]['total'])} / {_m(counts[k]['active'])}" for k in kinds) + " |")
    return rows


def write_card(out: Path, record: dict, evals: dict, counts: dict, routing: str | None) -> None:
    """Write ``out/README.md`` from the training record of this model and both models' results."""
    name = record["model"]
    a, t, env, data = record["train_args"], record["training"], record["environment"], record["data"]
    c = record["parameters"]
    tokens_seen = t["steps_done"] * a["batch_size"] * a["context"]
    is_moe = name == "ref-moe"
    lines = [f"# {TITLES[name]}", ""]
    lines += [
        "Trained from scratch by the swapmoe project (`scripts/reference/train.py`) on six styles of public-domain "
        "and CC BY-SA English text, as the default model of `swapmoe` and the model behind its accuracy figures. "
        "It is a small research model: it continues text in the style of its training books and knows little else.",
        "",
        "```bash",
        *(["swapmoe generate --prompt \"Once upon a time\" --memory-budget 50%   # the default model",
            "swapmoe eval-ppl --text data/heldout/all.txt --memory-budget 50%"] if is_moe else
          ["swapmoe eval-ppl models/ref-dense --text data/heldout/all.txt   # dense: loaded whole, no budget",
           "python -c \"from transformers import pipeline; "
           "print(pipeline('text-generation', 'models/ref-dense')('Once upon a time')[0]['generated_text'])\""]),
        "```",
        "",
        "## Model",
        "",
    ]
    if is_moe:
        lines += ["Qwen3-MoE (`model_type: qwen3_moe`): 8 decoder layers, every one a sparse MoE block of 16 SwiGLU "
                  "experts (intermediate 64) with top-2 routing and renormalised top-2 weights; hidden 256, 4 query "
                  "heads of 64 with 2 KV heads and QK-norm, RoPE, tied embeddings, vocabulary 8192."]
    else:
        lines += ["Qwen3 (`model_type: qwen3`), the dense twin of `ref-moe`: the same layers, attention and "
                  "embeddings, with one SwiGLU MLP of intermediate 128 (= 2 active experts x 64) in place of each "
                  "MoE block, so a token costs the same compute (the MoE's only extra is its 16 x 256 router per "
                  "layer). It is the \"static\" baseline of the SwapMoE paper: what the same per-token compute "
                  "buys without experts."]
    lines += ["", f"* parameters: {_m(c['total'])} in all, {_m(c['active'])} active per token"
              + (f" ({_m(c['experts'])} in experts)" if is_moe else ""),
              f"* weights stored in bfloat16 (trained in float32 with bfloat16 autocast): {_disk(out)}",
              "* context: trained on 512-token windows (`max_position_embeddings` 1024)",
              "* tokenizer: byte-level BPE, 8192 tokens, trained by `scripts/reference/bpe.py` on the training "
              "documents only; `<|endoftext|>` separates documents (bos = eos = pad); a plain-paragraph chat "
              "template so that chat requests work (this is a base model: it just continues the text)", ""]

    lines += ["## Data split", "",
              "Source: `../shared/data` (see its README; sha256 of each file in `data/heldout/manifest.json`). "
              "`scripts/reference/split_data.py` cuts every source into whole documents and, per domain, orders the "
              "eligible ones by `sha256(salt|domain|index|title)` and takes them in that order until they reach 7% "
              "(held-out) and then 3% (validation) of the domain's characters; the rest trains. Front and back "
              "matter of the books and Gutenberg licence text never reach the held-out part. Validation only picks "
              "the best step. The held-out text is in the repository, `data/heldout/` (one file per domain and "
              "`all.txt`, a mixed stream visiting the domains in turn, one whole document each time); "
              "`python scripts/reference/split_data.py` rebuilds it byte for byte.", ""]
    lines += _split_table(data["split"])
    lines += ["", f"Training stream: {data['train_tokens']:,} tokens; validation: {data['valid_tokens']:,} tokens.", ""]

    lines += ["## Training", "",
              f"* {t['steps_done']} steps of {a['batch_size']} x {a['context']} tokens (random windows of the "
              f"training stream, drawn once from seed {a['seed']}, the same for both models): {tokens_seen / 1e6:.1f} M "
              f"tokens, {tokens_seen / data['train_tokens']:.0f} passes over the training text"
              + (" (stopped by the time limit)" if t["stopped_by_time"] else ""),
              f"* AdamW (betas 0.9/0.95, weight decay {a['weight_decay']}), lr {a['lr']} with {a['warmup']} warm-up "
              f"steps and cosine decay to {a['min_lr_ratio']:.0%}, gradient clipping {a['grad_clip']}, dropout "
              f"{a['dropout']} on every attention and MLP output (training only)",
              ("* loss: next-token cross-entropy + 0.01 x the Switch-Transformer load-balancing loss of every MoE "
               "layer (`E * sum_e f_e * P_e`, computed within each layer: `train.py: balance_loss`; transformers' "
               "own `load_balancing_loss_func` pools all layers before the product and left experts unused)" if is_moe
               else "* loss: next-token cross-entropy"),
              f"* kept: step {t['best_step']} (lowest validation loss, {t['best_valid_loss']:.3f} nats)",
              f"* training time: {t['seconds']:.0f} s on {env['device']}; the whole command (split, tokenizer, both "
              f"models, evaluation, routing tables) took {env['command_seconds']:.0f} s",
              f"* software: torch {env['torch']}, transformers {env['transformers']}, tokenizers {env['tokenizers']}, "
              f"Python {env['python']}",
              f"* reproduce: `{env['command']}` (seeded; GPU sums are not bit-exact, so the figures may move in the "
              "last digits)", ""]
    lines += ["Validation loss during training (balance: the MoE's mean per-layer balance term on the training "
              "batch, 1 = perfectly even):", "", "| step | train loss | balance | valid loss | s |",
              "|---|---|---|---|---|"]
    curve = t["curve"]
    shown = curve if len(curve) <= 12 else [curve[i * (len(curve) - 1) // 11] for i in range(12)]
    lines += [f"| {e['step']} | {e['train_loss']:.3f} | {e['balance']:.3f} | {e['valid_loss']:.3f} | {e['seconds']} |"
              for e in shown]

    lines += ["", "## Held-out perplexity", "",
              "Each file read as one token stream, in order, in 512-token windows at batch 1 "
              "(`swapmoe.evaluation.stream_perplexity`, as `swapmoe eval-ppl` does), on the stored bfloat16 "
              "weights computed in float32 unless stated; every expert resident. Both models, same tokenizer:", ""]
    lines += _ppl_table(evals, counts)
    if is_moe:
        lines += ["", "With a memory budget the MoE keeps only some experts resident; `swapmoe eval-ppl "
                  "--memory-budget 50%` measures what Masked Gating costs (see the project README for figures).", ""]
        lines += ["## Routing: do the experts specialise?", "",
                  "Measured by `python scripts/reference/routing_report.py models/ref-moe` (plain transformers, every "
                  "expert resident, router top-2 of every token).", ""]
        lines += [routing or "(not measured)"]
    else:
        lines += ["", "Routing tables: see `models/ref-moe/README.md`.", ""]
    lines += ["## Licence", "",
              "Weights: Apache-2.0, like swapmoe. Training text: public domain (Shakespeare, Project Gutenberg "
              "books) and CC BY-SA 3.0 (WikiText-2).", ""]
    (out / "README.md").write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
