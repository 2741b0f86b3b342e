"""Train the reference model's byte-level BPE tokenizer and wrap it for transformers.

Byte-level so that any text (including the curly quotes of the Gutenberg books
and whatever a user types) encodes without an unknown token; trained on the
training documents only so that held-out perplexity is honest.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"  # document separator in training; also bos/eos/pad, as in GPT-2
VOCAB_SIZE = 8192

# A base model has no chat format of its own: render the conversation as plain
# paragraphs so that `apply_chat_template` works and the model simply continues
# the text.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] | trim }}\n\n{% endfor %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE tokenizer trained on ``texts`` (whole documents)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def to_transformers(tok: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    """Wrap for ``AutoTokenizer.from_pretrained`` (tokenizer.json + tokenizer_config.json)."""
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped
