"""A tiny MoE checkpoint with a tokenizer trained here, for engine and server tests (CPU, seconds).

Nothing is downloaded: a byte-level BPE tokenizer is trained on a few sentences and a small
Qwen3-MoE (8 experts, top-2) is built from a config with random weights and saved with
``save_pretrained``, so it is loaded back through ``swapmoe.load`` like any user checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

EOS = "<|endoftext|>"
CONTEXT = 256  # max_position_embeddings: small, so "prompt longer than the context" is cheap to test
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A mixture of experts routes every token to a few experts.",
    "Swapping experts in and out keeps memory within a budget.",
    "Once upon a time there was a king who had three daughters.",
    "The server streams tokens to many clients, one request at a time.",
    "Numbers like 1234567890 and symbols like {}[]()<>!?;: appear too.",
    "Ünïcödé text, emoji 🙂 and CJK 漢字 are encoded as bytes.",
]
# A simple chat template (the reference model's kind: plain paragraphs, then the reply).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # No full byte alphabet: only the bytes of the sentences, so random weights pick mostly words.
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=1, special_tokens=[EOS],
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                      model_max_length=CONTEXT, clean_up_tokenization_spaces=False)
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped


def build_checkpoint(path: Path, *, chat_template: str | None = CHAT_TEMPLATE, seed: int = 0) -> Path:
    """Write a tiny Qwen3-MoE checkpoint with its tokenizer to ``path``; return ``path``."""
    tokenizer = build_tokenizer(chat_template)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, max_position_embeddings=CONTEXT,
        # a wide init gives peaked, varied next-token distributions instead of near-uniform ones
        initializer_range=0.5, tie_word_embeddings=False,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).eval()
    # A zero output row gives end-of-sequence a logit of 0 against logits of std ~3 for the rest:
    # random weights then (practically) never end a generation early, so lengths in tests are exact.
    with torch.no_grad():
        model.lm_head.weight[eos_id] = 0.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
