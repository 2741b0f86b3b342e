"""Real servers on free loopback ports (uvicorn in a thread), each over its own tiny model."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from transformers import AutoTokenizer

import swapmoe
from swapmoe.server import ServerConfig, create_app, make_server
from tests.engine.tiny import build_checkpoint
from tests.threads import single_torch_thread

MODEL_NAME = "tiny-moe"


@dataclass
class Running:
    """A started server: its URL, app state (engine worker, model) and ready-made clients."""

    url: str
    app: Any
    model: Any
    tokenizer: Any
    api_key: str | None
    uvicorn: Any = None  # the uvicorn server: `should_exit = True` is what SIGTERM does
    clients: list[Any] = field(default_factory=list)  # closed when the server stops

    @property
    def worker(self) -> Any:
        return self.app.state.server.worker

    def openai(self, **kw: Any) -> OpenAI:
        kw.setdefault("api_key", self.api_key or "unused")
        client = OpenAI(base_url=f"{self.url}/v1", max_retries=0, timeout=60, **kw)
        self.clients.append(client)
        return client

    def http(self, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        kw.setdefault("timeout", 60)
        client = httpx.Client(base_url=self.url, headers=headers, **kw)
        self.clients.append(client)
        return client


@contextlib.contextmanager
def running_server(path: Path, config: ServerConfig, *, tokenizer: Any = None, **load_kw: Any) -> Iterator[Running]:
    """Load ``path`` (50% of the experts: Masked Gating is on) and serve it until the block ends."""
    load_kw.setdefault("memory_budget", "50%")
    model = swapmoe.load(path, device="cpu", **load_kw)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
    app = create_app(model, tokenizer, config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # a free port, held from now on: no race with other processes
    port = sock.getsockname()[1]
    server = make_server(app, log_level="warning")  # what `swapmoe serve` runs: read deadlines, drain
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # start-up may compile a decode step (prime_compiled_step)
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    running = Running(f"http://127.0.0.1:{port}", app, model, tokenizer, config.api_key, server)
    try:
        yield running
    finally:
        for client in running.clients:
            client.close()
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive(), "the test server did not stop"
        sock.close()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a 2-core CI machine the engine thread's
    OpenMP workers would fight the event loop (and the test's clients) for the cores."""
    with single_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny-moe"))


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, one_torch_thread: None) -> Iterator[Running]:
    """The main server: a fixed resident set (swaps_per_update=0), so a seed fixes the output."""
    config = ServerConfig(model_name=MODEL_NAME, max_queue=32, time_limit=60)
    with running_server(tiny_checkpoint, config, swaps_per_update=0) as running:
        yield running
