"""Issue 13, one test per case: hostile input, slow clients, big prompts, clients that leave, shutdown,
and reproducible answers within a budget. Raw sockets where the HTTP client would hide the behaviour
(a client that stops half-way), the official ``openai`` client elsewhere."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from swapmoe.server import ServerConfig
from swapmoe.server.body import PromptBytes
from tests.engine.tiny import CONTEXT, EOS, SENTENCES
from tests.server.conftest import MODEL_NAME, running_server
from tests.server.test_robustness import _Fault, _wait_idle

JSON = {"Content-Type": "application/json"}
BIG = 2 * 1024 * 1024  # a 2 MB prompt: thousands of times the context, and seconds to tokenise


def _samples(server) -> dict[str, list[tuple[dict, float]]]:
    with server.http() as http:
        text = http.get("/metrics").text
    out: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _value(samples, name, **labels) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def _address(server) -> tuple[str, int]:
    return "127.0.0.1", int(server.url.rsplit(":", 1)[1])


def _read_until_closed(sock: socket.socket, within: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes the connection (True) or ``within`` passes (False)."""
    sock.settimeout(0.1)
    data, deadline = b"", time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


# ------------------------------------------------------------------ case 1 and 5: input in user terms
def test_huge_integers_and_messages_in_user_terms(server):
    with server.http() as http:
        for field, literal in (("max_tokens", b"9" * 5000), ("seed", b"-" + b"7" * 4400)):
            r = http.post("/v1/completions", content=b'{"prompt": "x", "%s": %s}' % (field.encode(), literal),
                          headers=JSON)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == field and error["code"] == "integer_out_of_range", error
            assert "digits" in error["message"]
        # a long but convertible seed is still a seed (taken modulo 2**64)
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "seed": 10**4000})
        assert r.status_code == 200, r.text
    client = server.openai()
    cases = [
        (lambda: client.completions.create(model=MODEL_NAME, prompt=[5, -1]), "token id -1 at position 1 is negative"),
        (lambda: client.completions.create(model=MODEL_NAME, prompt=["a"] * 65), "too many prompts: 65; the limit is 64"),
        (lambda: client.completions.create(model=MODEL_NAME, prompt=[[1, 2], [3, -4]]), "prompt 1: token id -4"),
        (lambda: client.completions.create(model=MODEL_NAME, prompt="x", stop=3), "stop must be a string or a list"),
        (lambda: client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]), "images are not supported"),
    ]
    for call, expected in cases:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        message = info.value.body["message"]
        assert expected in message and "more problem" not in message and ".str" not in message, message
    assert client.completions.create(model=MODEL_NAME, prompt="x y", max_tokens=2).usage.completion_tokens == 2


# ------------------------------------------------------------------ case 8: the minor ones
def test_media_type_head_and_metric_labels(server):
    body = json.dumps({"prompt": "The quick", "max_tokens": 1}).encode()
    with server.http() as http:
        for headers in ({}, {"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}):
            r = http.post("/v1/completions", content=body, headers=headers)
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", (headers, r.text)
        assert http.post("/v1/completions", content=body,
                         headers={"Content-Type": "application/json; charset=utf-8"}).status_code == 200
        for path in ("/health", "/v1/models", f"/v1/models/{MODEL_NAME}", "/metrics"):
            r = http.head(path)
            assert r.status_code == 200 and r.content == b"", path
        assert http.get(f"/v1/models/{MODEL_NAME}").status_code == 200
    m = _samples(server)
    assert _value(m, "swapmoe_http_requests_total", endpoint="/v1/models/{name}", status="200") >= 2
    assert _value(m, "swapmoe_http_requests_total", endpoint="/v1/completions", status="415") >= 3


def test_api_key_is_checked_before_routing(tiny_checkpoint):
    config = ServerConfig(model_name=MODEL_NAME, api_key="sekret")
    with running_server(tiny_checkpoint, config, swaps_per_update=0) as srv, httpx.Client(base_url=srv.url) as anon:
        for method, path in [("POST", "/v1/embeddings"), ("GET", "/v1/completions"), ("DELETE", "/health"),
                             ("GET", "/nowhere")]:
            r = anon.request(method, path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (method, path)
        with srv.http() as http:  # with the key, the same requests get their 404/405
            assert http.post("/v1/embeddings").status_code == 404
            assert http.get("/v1/completions").status_code == 405


# ------------------------------------------------------------------ case 2: client leaves mid-upload
def test_client_leaving_during_upload_is_not_an_error(server, caplog):
    before = _samples(server)
    caplog.set_level(logging.WARNING)
    uvicorn_log = logging.getLogger("uvicorn.error")  # uvicorn's loggers do not propagate to the root
    uvicorn_log.addHandler(caplog.handler)
    try:
        _leave_during_upload(server)
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    after = _samples(server)
    assert (_value(after, "swapmoe_http_requests_total", status="500")
            == _value(before, "swapmoe_http_requests_total", status="500"))
    assert (_value(after, "swapmoe_http_requests_total", endpoint="/v1/completions", status="499")
            - _value(before, "swapmoe_http_requests_total", endpoint="/v1/completions", status="499")) == 10
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
    assert server.openai().completions.create(model=MODEL_NAME, prompt="x", max_tokens=2).usage.completion_tokens == 2


def _leave_during_upload(server) -> None:
    """Ten clients send half a body and disconnect; returns once the server has counted all ten."""
    before = _samples(server)
    for _ in range(10):
        with socket.create_connection(_address(server), timeout=5) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 10000\r\n\r\n" + b'{"prompt": "' + b"a" * 4000)
            time.sleep(0.05)  # the app is reading the body when the client goes
    deadline = time.monotonic() + 10
    while True:
        after = _samples(server)
        gone = (_value(after, "swapmoe_http_requests_total", endpoint="/v1/completions", status="499")
                - _value(before, "swapmoe_http_requests_total", endpoint="/v1/completions", status="499"))
        if gone >= 10 or time.monotonic() > deadline:
            break
        time.sleep(0.05)


# ------------------------------------------------------------------ case 4: read deadlines
def test_read_deadlines_close_slow_clients(tiny_checkpoint):
    config = ServerConfig(model_name=MODEL_NAME, header_timeout=0.5, body_timeout=0.5)
    with running_server(tiny_checkpoint, config, swaps_per_update=0) as srv:
        address = _address(srv)
        # a head trickled one header line at a time: 408 and closed, though bytes keep coming
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            start, closed, data = time.monotonic(), False, b""
            while not closed and time.monotonic() - start < 5:
                try:
                    sock.sendall(b"X-Slow: yes\r\n")
                except OSError:
                    break
                chunk, closed = _read_until_closed(sock, 0.1)
                data += chunk
            assert data.startswith(b"HTTP/1.1 408") and b"header_timeout" in data, data
            assert time.monotonic() - start < 2.5
        # a connection that sends nothing is closed without an answer
        with socket.create_connection(address, timeout=5) as sock:
            data, closed = _read_until_closed(sock, 3)
            assert closed and data == b""
        # twenty connections holding half a body: each gets 408 body_timeout, then is closed
        socks = [socket.create_connection(address, timeout=5) for _ in range(20)]
        try:
            for sock in socks:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000\r\n\r\n" + b'{"prompt": "' + b"a" * 400)
            start = time.monotonic()
            for sock in socks:
                data, closed = _read_until_closed(sock, 4)
                assert closed and data.startswith(b"HTTP/1.1 408") and b"body_timeout" in data, data
            assert time.monotonic() - start < 4
        finally:
            for sock in socks:
                sock.close()
        # a kept-alive connection: its next request's head is timed from its first byte
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.3)
            sock.sendall(b"GET /hea")
            data, closed = _read_until_closed(sock, 3)
            assert closed and data.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in data, data
        assert srv.openai().completions.create(model=MODEL_NAME, prompt="x", max_tokens=2).usage.completion_tokens == 2


# ------------------------------------------------------------------ case 3: big prompts
def _health_latencies(server, busy: threading.Event) -> list[float]:
    latencies = []
    with server.http() as http:
        while busy.is_set():
            start = time.monotonic()
            assert http.get("/health").status_code == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.02)
    return latencies


def _big_prompts(server, bodies: list[bytes], path: str = "/v1/completions") -> tuple[list, list[float]]:
    """Send ``bodies`` at once while /health is polled; (responses, /health latencies)."""
    busy = threading.Event()
    busy.set()
    clients = [server.http(timeout=120) for _ in bodies]
    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        health = pool.submit(_health_latencies, server, busy)
        futures = [pool.submit(c.post, path, content=b, headers=JSON) for c, b in zip(clients, bodies, strict=True)]
        try:
            responses = [f.result(timeout=120) for f in futures]
        finally:
            busy.clear()
        return responses, health.result(timeout=30)


def test_big_prompts_are_tokenised_off_the_event_loop(server):
    """The tiny tokenizer has no byte bound (its vocabulary lacks most bytes): the prompts are tokenised,
    on a worker thread, one at a time, while /health keeps answering."""
    assert server.app.state.server.prompt_bytes.bytes_per_token is None
    text = (" ".join(SENTENCES) * (BIG // 400))[: BIG // 2]
    responses, latencies = _big_prompts(server, [json.dumps({"prompt": text}).encode()] * 2)
    for r in responses:
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert latencies and max(latencies) < 1.0, max(latencies)
    assert server.openai().completions.create(model=MODEL_NAME, prompt="x", max_tokens=2).usage.completion_tokens == 2


def _full_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with all 256 bytes (as real models have), no larger than the tiny model's vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   model_max_length=CONTEXT, clean_up_tokenization_spaces=False)


def test_byte_length_bound_refuses_before_tokenising(tiny_checkpoint):
    tokenizer = _full_byte_tokenizer()
    with running_server(tiny_checkpoint, ServerConfig(model_name=MODEL_NAME), tokenizer=tokenizer,
                        swaps_per_update=0) as srv:
        bound = srv.app.state.server.prompt_bytes.bytes_per_token
        assert bound is not None and bound < 64
        text = ("Ünïcödé 🙂 " * (BIG // 10))[:BIG]
        bodies = [json.dumps({"prompt": text}, ensure_ascii=False).encode()] * 5
        start = time.monotonic()
        responses, latencies = _big_prompts(srv, bodies)
        for r in responses:
            error = r.json()["error"]
            # "at least": the refusal came from the byte length; tokenising would have counted exactly
            assert r.status_code == 400 and error["code"] == "context_length_exceeded", r.text
            assert "at least" in error["message"], error
        assert time.monotonic() - start < 10 and max(latencies) < 1.0, latencies
        chat = srv.http().post("/v1/chat/completions", content=json.dumps(
            {"messages": [{"role": "user", "content": text}]}, ensure_ascii=False).encode(), headers=JSON)
        assert chat.status_code == 400 and "at least" in chat.json()["error"]["message"]
        # the bound never refuses what fits: a prompt just inside the context is served
        fits = tokenizer.decode(tokenizer(" ".join(SENTENCES) * 20).input_ids[: CONTEXT - 4])
        out = srv.openai().completions.create(model=MODEL_NAME, prompt=fits, max_tokens=1)
        assert out.usage.prompt_tokens <= CONTEXT - 1


def test_prompt_byte_bound_holds_for_the_bundled_tokenizer():
    """No text encodes to fewer tokens than the bound says (else a prompt that fits would be refused)."""
    from swapmoe.loader import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    bound = PromptBytes(tokenizer)
    assert bound.bytes_per_token is not None
    samples = ["a" * 5000, " " * 5000, "=" * 3000 + "-" * 3000, "🙂" * 2000, "漢字" * 2000,
               "e\u0301" * 2000, "\x00\x01" * 2000, " ".join(SENTENCES) * 40]
    for text in samples:
        assert bound.min_tokens(text) <= len(tokenizer(text).input_ids), text[:20]
    assert bound.min_tokens("x" * 8_000_000) > 1024


# ------------------------------------------------------------------ case 6: a cancelled stream is counted
def test_cancelled_stream_is_counted(server):
    before = _samples(server)
    with _Fault(server.model, sleep=0.05), server.http() as http:
        with http.stream("POST", "/v1/completions", json={"prompt": "The quick", "max_tokens": 200,
                                                             "stream": True}) as r:
            assert next(line for line in r.iter_lines() if line.startswith("data:"))
        _wait_idle(server, within=5.0)
    deadline = time.monotonic() + 5
    while True:
        after = _samples(server)
        cancelled = (_value(after, "swapmoe_generations_total", endpoint="completions", reason="cancelled")
                     - _value(before, "swapmoe_generations_total", endpoint="completions", reason="cancelled"))
        if cancelled or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert cancelled == 1
    assert (_value(after, "swapmoe_request_duration_seconds_count")
            == _value(before, "swapmoe_request_duration_seconds_count") + 1)


# ------------------------------------------------------------------ case 7: shutdown drains
def _stream_lines(url: str, body: dict, out: list, started: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=30) as http, http.stream("POST", "/v1/completions", json=body) as r:
        out.append(r.status_code)
        for line in r.iter_lines():
            if line:
                out.append(line)
                started.set()


def test_shutdown_ends_streams_cleanly_and_answers_waiting_requests_503(tiny_checkpoint):
    config = ServerConfig(model_name=MODEL_NAME, shutdown_grace=0.5)
    with running_server(tiny_checkpoint, config, swaps_per_update=0) as srv, _Fault(srv.model, sleep=0.05):
        lines: list = []
        started = threading.Event()
        streaming = threading.Thread(target=_stream_lines, args=(srv.url, {
            "prompt": "The quick", "max_tokens": 200, "stream": True}, lines, started))
        streaming.start()
        assert started.wait(10)
        waiting = []
        with ThreadPoolExecutor(2) as pool:
            for stream in (False, True):
                waiting.append(pool.submit(httpx.post, f"{srv.url}/v1/completions", timeout=30, json={
                    "prompt": "A mixture", "max_tokens": 5, "stream": stream}))
            deadline = time.monotonic() + 10
            while srv.worker.queue_length < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            start = time.monotonic()
            srv.uvicorn.should_exit = True  # what uvicorn's SIGTERM handler does
            for f in waiting:
                r = f.result(timeout=10)
                assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
            assert time.monotonic() - start < 1.0  # at once, not after the grace period
        streaming.join(10)
        assert lines[0] == 200 and lines[-1] == "data: [DONE]", lines[-3:]
        last = json.loads(lines[-2][len("data: "):])
        assert last["choices"][0]["finish_reason"] == "length", last
        assert 0.4 < time.monotonic() - start < 3.0  # the stream had its grace period, then ended


# ------------------------------------------------------------------ case 10: reproducible within a budget
def test_fixed_resident_set_gives_the_same_answer(tiny_checkpoint):
    config = ServerConfig(model_name=MODEL_NAME, resident_set="fixed", warmup_tokens=120)
    # a small budget, frequent updates: the set moves at every few tokens until it is held
    with running_server(tiny_checkpoint, config, memory_budget="30%", update_interval=2,
                        swaps_per_update=1) as srv:
        client, runtime = srv.openai(), srv.model.swapmoe
        with srv.http() as http:
            assert http.get("/health").json()["resident_set"] == "warming up"
            for sentence in SENTENCES * 3:
                client.completions.create(model=MODEL_NAME, prompt=sentence, max_tokens=8, temperature=0)
                if http.get("/health").json()["resident_set"] == "fixed":
                    break
            assert http.get("/health").json()["resident_set"] == "fixed"
        assert runtime.stats()["total"]["swaps"] > 0  # the warm-up did move experts
        held, swaps = runtime.resident_sets(), runtime.stats()["total"]["swaps"]
        request = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
        answers = []
        for sentence in SENTENCES[:5]:
            answers.append(client.completions.create(**request).choices[0].text)
            client.completions.create(model=MODEL_NAME, prompt=sentence * 3, max_tokens=16, temperature=0.9,
                                      seed=1)
        assert len(set(answers)) == 1, answers
        assert runtime.resident_sets() == held and runtime.stats()["total"]["swaps"] == swaps
        # under load: the same request among concurrent others gives the same answer again
        with ThreadPoolExecutor(4) as pool:
            clients = [srv.openai() for _ in range(4)]
            futures = [pool.submit(lambda c: c.completions.create(**request).choices[0].text, clients[i % 4])
                       for i in range(8)]
            others = [pool.submit(clients[i % 4].completions.create, model=MODEL_NAME, prompt=s, max_tokens=8)
                      for i, s in enumerate(SENTENCES)]
            assert {f.result(timeout=60) for f in futures} == {answers[0]}
            [f.result(timeout=60) for f in others]


def test_reset_resident_set_adapts_within_requests_and_gives_the_same_answer(tiny_checkpoint):
    """--resident-set reset: every request starts from the state after the warm-up, so the same request
    gives the same answer after others moved experts, while the set still moves within each request."""
    config = ServerConfig(model_name=MODEL_NAME, resident_set="reset", warmup_tokens=60)
    with running_server(tiny_checkpoint, config, memory_budget="30%", update_interval=2,
                        swaps_per_update=1) as srv:
        client, runtime = srv.openai(), srv.model.swapmoe
        with srv.http() as http:
            for sentence in SENTENCES * 3:
                client.completions.create(model=MODEL_NAME, prompt=sentence, max_tokens=8, temperature=0)
                if http.get("/health").json()["resident_set"] == "reset per request":
                    break
            assert http.get("/health").json()["resident_set"] == "reset per request"
        start = runtime.resident_sets()
        request = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
        answers, swaps = [], runtime.stats()["total"]["swaps"]
        for sentence in SENTENCES[:4]:
            answers.append(client.completions.create(**request).choices[0].text)
            client.completions.create(model=MODEL_NAME, prompt=sentence * 3, max_tokens=16, temperature=0.9,
                                      seed=1)
        assert len(set(answers)) == 1, answers
        stats = runtime.stats()["total"]
        assert stats["swaps"] > swaps  # the set still adapts within requests
        assert stats["restored"] > 0  # and is brought back before each one
        control = srv.app.state.server.resident
        srv.worker.submit(lambda ctx: control.before_request()).future.result(timeout=30)  # on the engine thread
        assert runtime.resident_sets() == start


def test_sigterm_drains_a_real_server_process():
    """`swapmoe serve` (the bundled model) gets SIGTERM during a long stream with two requests waiting."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "swapmoe.cli", "serve", "-m", "50%", "--port", str(port),
                             "--shutdown-grace", "0.5", "--served-model-name", "ref-moe", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        lines: list = []
        started = threading.Event()
        streaming = threading.Thread(target=_stream_lines, args=(url, {
            "prompt": "Once upon a time", "max_tokens": 1000, "stream": True}, lines, started))
        streaming.start()
        assert started.wait(30)
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(httpx.post, f"{url}/v1/completions", timeout=30,
                                   json={"prompt": "Hello", "max_tokens": 5, "stream": stream}) for stream in (False, True)]
            deadline = time.monotonic() + 30
            while httpx.get(f"{url}/health", timeout=5).json()["queue_length"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            for f in waiting:
                r = f.result(timeout=30)
                assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
        streaming.join(30)
        assert lines[0] == 200 and lines[-1] == "data: [DONE]", lines[-3:]
        assert json.loads(lines[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
        proc.wait(30)
        output = proc.stdout.read().decode()
        assert "Traceback" not in output and "Internal Server Error" not in output, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# ------------------------------------------------------------------ case 9: the lm-eval example
def test_lm_eval_example_passes_the_context_as_max_length(server):
    """docs/server.md's lm-eval command passes max_length = the bundled model's context; lm-eval then
    sends at most max_length - 1 prompt tokens with max_tokens=1, which the server accepts (one more
    token is refused). The end-to-end run is scripts/check_lm_eval.py (needs lm-eval installed)."""
    import re
    from pathlib import Path

    from swapmoe.loader import default_model_path

    root = Path(__file__).resolve().parents[2]
    command = re.search(r"^lm_eval .*?(?<!\\)$", (root / "docs" / "server.md").read_text(), flags=re.M | re.S)
    assert command is not None
    args = dict(kv.split("=", 1) for kv in command.group(0).split("--model_args", 1)[1].split()[0].split(","))
    context = json.loads((Path(default_model_path()) / "config.json").read_text())["max_position_embeddings"]
    assert int(args["max_length"]) == context
    ids = (server.tokenizer(" ".join(SENTENCES) * 20).input_ids * 2)[: CONTEXT]
    client = server.openai()
    out = client.completions.create(model=MODEL_NAME, prompt=ids[: CONTEXT - 1], max_tokens=1, echo=True,
                                    logprobs=1, temperature=0, seed=1234)
    assert len(out.choices[0].logprobs.tokens) == CONTEXT
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=1, echo=True, logprobs=1)


def test_shutdown_lets_a_stream_finish_within_the_grace_period(tiny_checkpoint):
    config = ServerConfig(model_name=MODEL_NAME, shutdown_grace=10)
    with running_server(tiny_checkpoint, config, swaps_per_update=0) as srv, _Fault(srv.model, sleep=0.05):
        lines: list = []
        started = threading.Event()
        streaming = threading.Thread(target=_stream_lines, args=(srv.url, {
            "prompt": "The quick", "max_tokens": 20, "stream": True, "stream_options": {"include_usage": True}},
            lines, started))
        streaming.start()
        assert started.wait(10)
        srv.uvicorn.should_exit = True
        streaming.join(15)
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][len("data: "):])["usage"]["completion_tokens"] == 20  # all of it
