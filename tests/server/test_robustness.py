"""Bad input, crashes inside generation, clients that go away, time limits, keys and a full queue:
each gets its answer and the server goes on serving."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import openai
import pytest

from swapmoe.server import ServerConfig
from tests.engine.tiny import CONTEXT
from tests.server.conftest import MODEL_NAME, running_server

OK_COMPLETION = {"model": MODEL_NAME, "prompt": "The quick brown fox", "max_tokens": 3}
OK_CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
LONG_TEXT = " ".join(["quick brown fox"] * CONTEXT)  # far more tokens than the context


def _completion(**changes):
    return json.dumps({**OK_COMPLETION, **changes}).encode()


def _chat(**changes):
    return json.dumps({**OK_CHAT, **changes}).encode()


# (name, method, path, body bytes, expected status)
CATALOGUE = [
    ("bad JSON", "POST", "/v1/completions", b'{"prompt": "x", ', 400),
    ("JSON not an object", "POST", "/v1/completions", b'["x"]', 400),
    ("empty body", "POST", "/v1/chat/completions", b"", 400),
    ("invalid UTF-8", "POST", "/v1/completions", b'{"prompt": "\xff\xfe x"}', 400),
    ("unpaired surrogate", "POST", "/v1/completions", b'{"prompt": "\\ud800 x"}', 400),
    ("surrogate in chat", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400),
    ("surrogate in model name", "POST", "/v1/completions", b'{"prompt": "x", "model": "\\ud800"}', 400),
    ("surrogate in a key", "POST", "/v1/completions", b'{"prompt": "x", "\\ud800": 1}', 400),
    ("surrogate in a message name", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "x", "name": "\\ud800"}]}', 400),
    ("max_tokens as string", "POST", "/v1/completions", _completion(max_tokens="5"), 400),
    ("max_tokens as float", "POST", "/v1/completions", _completion(max_tokens=2.5), 400),
    ("temperature as string", "POST", "/v1/completions", _completion(temperature="hot"), 400),
    ("stream as string", "POST", "/v1/completions", _completion(stream="yes"), 400),
    ("prompt as number", "POST", "/v1/completions", _completion(prompt=5), 400),
    ("prompt missing", "POST", "/v1/completions", json.dumps({"model": MODEL_NAME}).encode(), 400),
    ("messages as string", "POST", "/v1/chat/completions", _chat(messages="hi"), 400),
    ("unknown model", "POST", "/v1/completions", _completion(model="gpt-4"), 404),
    ("unknown model (chat)", "POST", "/v1/chat/completions", _chat(model="gpt-4"), 404),
    ("negative max_tokens", "POST", "/v1/completions", _completion(max_tokens=-1), 400),
    ("huge max_tokens", "POST", "/v1/completions", _completion(max_tokens=10**12), 400),
    ("enormous max_tokens", "POST", "/v1/chat/completions", _chat(max_tokens=2**80), 400),
    ("prompt longer than context", "POST", "/v1/completions", _completion(prompt=LONG_TEXT), 400),
    ("chat longer than context", "POST", "/v1/chat/completions",
     _chat(messages=[{"role": "user", "content": LONG_TEXT}]), 400),
    ("token ids outside vocabulary", "POST", "/v1/completions", _completion(prompt=[1, 2, 10**6]), 400),
    ("negative token id", "POST", "/v1/completions", _completion(prompt=[1, -2]), 400),
    ("empty prompt", "POST", "/v1/completions", _completion(prompt=""), 400),
    ("empty prompt list", "POST", "/v1/completions", _completion(prompt=[]), 400),
    ("empty messages", "POST", "/v1/chat/completions", _chat(messages=[]), 400),
    ("unknown role", "POST", "/v1/chat/completions", _chat(messages=[{"role": "wizard", "content": "x"}]), 400),
    ("image content", "POST", "/v1/chat/completions",
     _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400),
    ("unknown field", "POST", "/v1/completions", _completion(frobnicate=True), 400),
    ("unknown field (chat)", "POST", "/v1/chat/completions", _chat(temprature=0.5), 400),
    ("n=2", "POST", "/v1/completions", _completion(n=2), 400),
    ("best_of=3", "POST", "/v1/completions", _completion(best_of=3), 400),
    ("logprobs too many", "POST", "/v1/completions", _completion(logprobs=100), 400),
    ("top_logprobs without logprobs", "POST", "/v1/chat/completions", _chat(top_logprobs=2), 400),
    ("negative temperature", "POST", "/v1/completions", _completion(temperature=-1), 400),
    ("NaN temperature", "POST", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400),
    ("top_p above 1", "POST", "/v1/completions", _completion(top_p=2), 400),
    ("too many stop strings", "POST", "/v1/completions", _completion(stop=["a"] * 50), 400),
    ("stop as number", "POST", "/v1/completions", _completion(stop=3), 400),
    ("penalty", "POST", "/v1/chat/completions", _chat(presence_penalty=1.0), 400),
    ("tools", "POST", "/v1/chat/completions",
     _chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400),
    ("max_tokens of 5000 digits", "POST", "/v1/completions",
     b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400),
    ("seed of 5000 digits", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "x"}], "seed": -' + b"7" * 5000 + b"}", 400),
    ("token id of 5000 digits", "POST", "/v1/completions", b'{"prompt": [1, ' + b"3" * 5000 + b"]}", 400),
    ("too many prompts", "POST", "/v1/completions", _completion(prompt=["a"] * 65), 400),
    ("boolean token id", "POST", "/v1/completions", _completion(prompt=[[1], [True]]), 400),
    ("unknown path", "POST", "/v1/embeddings", _completion(), 404),
    ("wrong method", "GET", "/v1/completions", None, 405),
]


@pytest.mark.parametrize("stream", [False, True])
def test_bad_input_catalogue_then_a_valid_request(server, stream):
    with server.http() as http:
        for name, method, path, body, status in CATALOGUE:
            if stream and body and body.startswith(b"{") and method == "POST":
                with contextlib.suppress(ValueError):  # the malformed bodies stay as they are
                    body = json.dumps({"stream": True, **json.loads(body)}).encode()
            r = http.request(method, path, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == status, (name, r.status_code, r.text)
            error = r.json()["error"]
            assert isinstance(error["message"], str) and error["message"], name
            assert error["type"] and "param" in error and "code" in error, name
        too_big = b'{"prompt": "' + b"x" * (9 * 1024 * 1024) + b'"}'
        r = http.post("/v1/completions", content=too_big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413
    out = server.openai().completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=3)
    assert out.usage.completion_tokens == 3


def test_openai_client_sees_typed_errors(server):
    client = server.openai()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL_NAME, prompt=LONG_TEXT, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], n=2)


class _Fault:
    """A forward hook that raises (or sleeps) on chosen forward passes of the served model."""

    def __init__(self, model, *, fail_on=(), sleep=0.0):
        self.calls = 0
        self.fail_on = set(fail_on)
        self.sleep = sleep
        self.handle = model.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1
        if self.sleep:
            time.sleep(self.sleep)
        if self.calls in self.fail_on:
            raise RuntimeError("injected fault")
        return output

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_generation_error_is_500_then_service_goes_on(server):
    client = server.openai()
    # the prompt's forward fails
    with _Fault(server.model, fail_on={1}), pytest.raises(openai.InternalServerError, match="injected fault"):
        client.completions.create(model=MODEL_NAME, prompt="The quick", max_tokens=5)
    with _Fault(server.model, fail_on={1}), server.http() as http:
        r = http.post("/v1/chat/completions", json={**OK_CHAT, "stream": True})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    # mid-stream: an error event ends the stream
    with _Fault(server.model, fail_on={3}), pytest.raises(openai.APIError, match="injected fault"):
        for _ in client.completions.create(model=MODEL_NAME, prompt="The quick", max_tokens=10, stream=True):
            pass
    out = client.completions.create(model=MODEL_NAME, prompt="The quick", max_tokens=5)
    assert out.usage.completion_tokens == 5


def _wait_idle(server, within):
    deadline = time.monotonic() + within
    while server.worker.busy or server.worker.queue_length:
        assert time.monotonic() < deadline, "the engine is still busy"
        time.sleep(0.01)


def test_client_disconnect_stops_generation(server):
    with _Fault(server.model, sleep=0.05) as fault, server.http() as http:  # 200 tokens would take 10 s
        body = {**OK_COMPLETION, "max_tokens": 200, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        # the connection is closed: the job stops before its next token
        _wait_idle(server, within=2.0)
        assert fault.calls < 60
        # a non-streaming client that gives up
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={**OK_COMPLETION, "max_tokens": 200}, timeout=0.5)
        _wait_idle(server, within=2.0)
        assert fault.calls < 120


def test_time_limit_truncates_generation(tiny_checkpoint):
    config = ServerConfig(model_name=MODEL_NAME, time_limit=0.5)
    with running_server(tiny_checkpoint, config, swaps_per_update=0) as srv, _Fault(srv.model, sleep=0.05):
        start = time.monotonic()
        out = srv.openai().completions.create(model=MODEL_NAME, prompt="The quick", max_tokens=200)
        assert time.monotonic() - start < 3.0
        assert out.choices[0].finish_reason == "length" and 0 < out.usage.completion_tokens < 200
        # several prompts: the limit passes during the first one, so the request cannot be completed
        with pytest.raises(openai.InternalServerError, match="time limit") as info:
            srv.openai().completions.create(model=MODEL_NAME, prompt=["The quick", "A mixture"], max_tokens=200)
        assert info.value.status_code == 503
        assert srv.openai().completions.create(model=MODEL_NAME, prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_api_key_and_full_queue(tiny_checkpoint):
    config = ServerConfig(model_name=MODEL_NAME, api_key="sekret", max_queue=1)
    with running_server(tiny_checkpoint, config, swaps_per_update=0) as srv:
        # 401 without the key, with a wrong key, on every endpoint
        with httpx.Client(base_url=srv.url) as anonymous:
            for method, path in [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                                 ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/health")]:
                r = anonymous.request(method, path, json=OK_COMPLETION)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
            r = anonymous.post("/v1/completions", json=OK_COMPLETION, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            srv.openai(api_key="wrong").models.list()
        client = srv.openai()
        assert client.completions.create(model=MODEL_NAME, prompt="x y", max_tokens=2).usage.completion_tokens == 2

        # occupy the engine, fill the one queue place, and the next request gets 429 + Retry-After
        # (wait for the blocker itself to start: `busy` can still be the previous request's tail,
        # with the blocker waiting in the queue place the next request needs)
        gate, started = threading.Event(), threading.Event()
        blocker = srv.worker.submit(lambda ctx: (started.set(), gate.wait(30)))
        assert started.wait(30) and srv.worker.busy and srv.worker.queue_length == 0
        waiting = {}
        thread = threading.Thread(target=lambda: waiting.setdefault(
            "out", client.completions.create(model=MODEL_NAME, prompt="x y", max_tokens=2)))
        thread.start()
        while srv.worker.queue_length < 1:
            time.sleep(0.01)
        with srv.http() as http:
            r = http.post("/v1/completions", json=OK_COMPLETION)
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
            metrics = http.get("/metrics").text
            assert "swapmoe_queue_length 1.0" in metrics and "swapmoe_requests_running 1.0" in metrics
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}])
        gate.set()
        blocker.future.result(timeout=10)
        thread.join(30)
        assert waiting["out"].usage.completion_tokens == 2  # the queued request was served
