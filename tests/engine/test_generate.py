"""The engine without the server: step -> stream -> whole, on a swapmoe model with Masked Gating on."""

import threading
import time

import pytest
import torch

from swapmoe.engine import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    FINISH_TIMEOUT,
    SamplingParams,
    context_length,
    generate,
    prefill,
    stream_generate,
)
from tests.engine.tiny import CONTEXT

PROMPT = "Once upon a time there was a king who"


def test_greedy_matches_transformers_generate(model, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    ours = generate(model, tokenizer, ids, SamplingParams(max_tokens=12, temperature=0))
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
    eos = tokenizer.eos_token_id
    ref = ref[: ref.index(eos) + 1] if eos in ref else ref
    assert ours.token_ids == ref
    assert ours.prompt_tokens == len(ids) and ours.finish_reason in (FINISH_LENGTH, FINISH_STOP)


def test_stream_and_whole_agree_and_seed_fixes_output(model, tokenizer):
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=42)
    whole = generate(model, tokenizer, PROMPT, params)
    events = list(stream_generate(model, tokenizer, tokenizer(PROMPT).input_ids, params))
    assert "".join(e.text for e in events) == whole.text
    assert [e.token_id for e in events if e.token_id is not None] == whole.token_ids
    assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
    assert generate(model, tokenizer, PROMPT, params).text == whole.text
    others = {generate(model, tokenizer, PROMPT, SamplingParams(max_tokens=20, seed=s)).text for s in range(4)}
    assert len(others) > 1


def test_stop_string_ends_generation_without_its_text(model, tokenizer):
    full = generate(model, tokenizer, PROMPT, SamplingParams(max_tokens=30, temperature=0)).text
    stop = full[7:10]
    cut = generate(model, tokenizer, PROMPT, SamplingParams(max_tokens=30, temperature=0, stop=(stop,)))
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == FINISH_STOP


def test_logprobs_of_generated_tokens(model, tokenizer):
    out = generate(model, tokenizer, PROMPT, SamplingParams(max_tokens=6, temperature=0, logprobs=2))
    assert len(out.logprobs) == len(out.top_logprobs) == len(out.token_ids)
    for tok, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs, strict=True):
        assert top[0] == (tok, lp) and len(top) == 2  # greedy: the chosen token is the best


def test_prefill_scores_the_prompt(model, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    state = prefill(model, ids, score_top_k=1)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert state.scores.logprobs[0] is None and state.scores.top_logprobs[0] is None
    assert state.scores.logprobs[1:] == pytest.approx(expected.tolist(), abs=1e-5)
    assert torch.allclose(state.next_logits, logits[-1], atol=1e-5)
    with pytest.raises(ValueError):
        prefill(model, [])


def test_max_tokens_zero_and_context_limit(model, tokenizer):
    out = generate(model, tokenizer, PROMPT, SamplingParams(max_tokens=0))
    assert (out.text, out.token_ids, out.finish_reason) == ("", [], FINISH_LENGTH)
    assert context_length(model) == CONTEXT
    ids = (tokenizer(PROMPT).input_ids * CONTEXT)[: CONTEXT - 3]
    out = generate(model, tokenizer, ids, SamplingParams(max_tokens=50, temperature=0))
    assert out.finish_reason in (FINISH_LENGTH, FINISH_STOP) and len(out.token_ids) <= 3


def test_cancel_and_deadline_stop_before_the_next_token(model, tokenizer):
    cancel = threading.Event()
    stream = stream_generate(model, tokenizer, tokenizer(PROMPT).input_ids, SamplingParams(max_tokens=100),
                             cancel=cancel)
    next(stream)
    cancel.set()
    rest = list(stream)
    assert len(rest) == 1 and rest[0].finish_reason == FINISH_CANCELLED and rest[0].token_id is None
    out = generate(model, tokenizer, PROMPT, SamplingParams(max_tokens=100), deadline=time.monotonic())
    assert out.finish_reason == FINISH_TIMEOUT and out.token_ids == []
