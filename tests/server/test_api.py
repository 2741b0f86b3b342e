"""The server through the official ``openai`` client: completions, chat, streaming, stops, seeds,
logprobs, echo scoring (lm-evaluation-harness style), /v1/models, /health and /metrics."""

from __future__ import annotations

import math

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import MODEL_NAME

PROMPT = "Once upon a time there was a king who"


def _stream_completion(client, **kw):
    text, finish, chunks = "", None, 0
    for chunk in client.completions.create(model=MODEL_NAME, stream=True, **kw):
        chunks += 1
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    return text, finish, chunks


def _stream_chat(client, **kw):
    text, finish, roles = "", None, []
    for chunk in client.chat.completions.create(model=MODEL_NAME, stream=True, **kw):
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish, roles


def test_models_and_health(server):
    client = server.openai()
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    with server.http() as http:
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert http.get(f"/v1/models/{MODEL_NAME}").json()["id"] == MODEL_NAME
        assert http.get("/v1/models/other").status_code == 404


def test_completion_non_streaming_and_streaming_agree(server):
    client = server.openai()
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == MODEL_NAME
    assert choice.text and choice.finish_reason == "length"
    n_prompt = len(server.tokenizer(PROMPT).input_ids)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)
    text, finish, chunks = _stream_completion(client, prompt=PROMPT, max_tokens=12, temperature=0)
    assert (text, finish) == (choice.text, "length") and chunks >= 2


def test_stream_usage_chunk(server):
    client = server.openai()
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_chat_non_streaming_and_streaming_agree(server):
    client = server.openai()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the fox."}]
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, seed=5)
    message = out.choices[0].message
    assert out.object == "chat.completion" and message.role == "assistant" and message.content
    assert out.usage.completion_tokens == 10 and out.choices[0].finish_reason == "length"
    text, finish, roles = _stream_chat(client, messages=messages, max_tokens=10, seed=5)
    assert (text, finish, roles) == (message.content, "length", ["assistant"])


def test_same_seed_same_output_different_seeds_differ(server):
    client = server.openai()

    def sample(seed):
        return client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=1.0,
                                         top_p=0.95, seed=seed).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert len({first, sample(1), sample(2), sample(3)}) > 1


def test_stop_strings_across_token_boundaries(server):
    client = server.openai()
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=40, temperature=0, logprobs=0)
    tokens = full.choices[0].logprobs.tokens
    text = full.choices[0].text
    assert "".join(tokens) == text
    # a stop string made of the end of one token and the start of the next one
    k = next(i for i in range(3, len(tokens) - 1) if len(tokens[i]) >= 2 and len(tokens[i + 1]) >= 2
             and "\ufffd" not in tokens[i] + tokens[i + 1])
    stop = tokens[k][-2:] + tokens[k + 1][:2]
    expected = text[: text.find(stop)]
    for stream in (False, True):
        kw = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stop": [stop, "never appears"]}
        if stream:
            got, finish, _ = _stream_completion(client, **kw)
        else:
            choice = client.completions.create(model=MODEL_NAME, **kw).choices[0]
            got, finish = choice.text, choice.finish_reason
        assert (got, finish) == (expected, "stop")
    # chat: the same rule
    messages = [{"role": "user", "content": "hello"}]
    full_chat = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=30,
                                               temperature=0).choices[0].message.content
    assert len(full_chat) >= 8
    stop = full_chat[5:8]
    got, finish, _ = _stream_chat(client, messages=messages, max_tokens=30, temperature=0, stop=stop)
    assert (got, finish) == (full_chat[: full_chat.find(stop)], "stop")


def test_completion_logprobs(server):
    client = server.openai()
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    for value, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and 1 <= len(top) <= 3
        assert value == pytest.approx(max(top.values()))  # greedy: the chosen token is the best one
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_chat_logprobs(server):
    client = server.openai()
    out = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == 6
    assert "".join(c.token for c in content) == out.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 2 and c.logprob == pytest.approx(c.top_logprobs[0].logprob)
        assert bytes(c.bytes).decode("utf-8") == c.token


def _reference_logprobs(server, ids):
    """log p(token i | tokens < i) straight from the model (the server is idle meanwhile)."""
    with torch.inference_mode():
        logits = server.model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_echo_scores_prompt_like_lm_eval_harness(server):
    """lm-eval's local-completions: token-id prompts, max_tokens=0 (or 1), echo=True, logprobs=1."""
    client = server.openai()
    contexts = ["The quick brown fox", "A mixture of experts routes every token"]
    batch = [server.tokenizer(c).input_ids for c in contexts]
    out = client.completions.create(model=MODEL_NAME, prompt=batch, max_tokens=0, echo=True, logprobs=1,
                                    temperature=0, seed=1234)
    assert [c.index for c in out.choices] == [0, 1]
    for choice, ids, text in zip(out.choices, batch, contexts, strict=True):
        lp = choice.logprobs
        assert choice.text == text
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(_reference_logprobs(server, ids), abs=1e-4)
        for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
            assert len(top) == 1 and max(top.values()) >= value - 1e-6  # lm-eval's is_greedy check
    assert out.usage.prompt_tokens == sum(len(ids) for ids in batch) and out.usage.completion_tokens == 0
    # max_tokens=1: the prompt's scores plus one generated token
    one = client.completions.create(model=MODEL_NAME, prompt=contexts[0], max_tokens=1, echo=True, logprobs=1,
                                    temperature=0).choices[0]
    assert len(one.logprobs.tokens) == len(batch[0]) + 1 and one.text.startswith(contexts[0])
    assert all(math.isfinite(v) for v in one.logprobs.token_logprobs[1:])
    # echo alone (no logprobs): the prompt comes back in front of the completion
    echoed = client.completions.create(model=MODEL_NAME, prompt=contexts[0], max_tokens=4, echo=True,
                                       temperature=0).choices[0]
    plain = client.completions.create(model=MODEL_NAME, prompt=contexts[0], max_tokens=4,
                                      temperature=0).choices[0]
    assert echoed.text == contexts[0] + plain.text and echoed.logprobs is None
    # streamed echo: the prompt first, then the completion
    text, _, _ = _stream_completion(client, prompt=contexts[0], max_tokens=4, echo=True, temperature=0)
    assert text == echoed.text


def test_chat_without_template_uses_documented_fallback(tiny_checkpoint):
    from swapmoe.server import ServerConfig
    from swapmoe.server.chat import fallback_text
    from swapmoe.server.protocol import ChatMessage
    from tests.engine.tiny import build_tokenizer
    from tests.server.conftest import running_server

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert fallback_text([ChatMessage(**m) for m in messages]) == "System: Be brief.\nUser: Hi\nAssistant:"
    tokenizer = build_tokenizer(chat_template=None)
    with running_server(tiny_checkpoint, ServerConfig(model_name=MODEL_NAME), tokenizer=tokenizer,
                        swaps_per_update=0) as srv:
        out = srv.openai().chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5)
        n_prompt = len(tokenizer("System: Be brief.\nUser: Hi\nAssistant:").input_ids)
        assert out.usage.prompt_tokens == n_prompt and out.choices[0].finish_reason in ("length", "stop")


def _metrics(server):
    with server.http() as http:
        response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def test_metrics_are_prometheus_text(server):
    client = server.openai()
    client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5)
    list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, stream=True))
    m = _metrics(server)
    requests = {(lab["endpoint"], lab["status"]): v for lab, v in m["swapmoe_http_requests_total"]}
    assert requests[("/v1/completions", "200")] >= 2
    assert m["swapmoe_generation_tokens_total"][0][1] >= 10
    assert m["swapmoe_prompt_tokens_total"][0][1] > 0
    assert m["swapmoe_time_to_first_token_seconds_count"][0][1] >= 2
    assert m["swapmoe_time_per_output_token_seconds_count"][0][1] >= 8
    assert m["swapmoe_queue_length"][0][1] == 0
    assert 0.0 <= m["swapmoe_expert_hit_rate"][0][1] <= 1.0
    assert m["swapmoe_expert_lookups_total"][0][1] > 0
    assert "swapmoe_expert_swaps_total" in m and "swapmoe_expert_bytes_copied_total" in m
    resident = {lab["layer"]: v for lab, v in m["swapmoe_resident_expert_bytes"]}
    stats = server.model.swapmoe.stats()
    assert resident == {str(la["layer"]): la["resident_bytes"] for la in stats["layers"]}
    assert sum(resident.values()) <= stats["total"]["budget_bytes"] < stats["total"]["total_expert_bytes"]
