"""Many concurrent streaming clients: every response complete, none lost, each equal to the same
request run alone with the same seed (the engine runs one request at a time from its queue)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.engine.tiny import SENTENCES
from tests.server.conftest import MODEL_NAME

CLIENTS = 10
REQUESTS = 56


def _requests():
    out = []
    for i in range(REQUESTS):
        kw = {"max_tokens": 6 + i % 9, "temperature": 0.7 + 0.1 * (i % 4), "top_p": 0.9 if i % 3 else 1.0,
              "seed": 1000 + i}
        if i % 5 == 4:
            kw["stop"] = ["e "]
        if i % 2:
            out.append(("chat", {"messages": [{"role": "user", "content": SENTENCES[i % len(SENTENCES)]}], **kw}))
        else:
            out.append(("completion", {"prompt": SENTENCES[i % len(SENTENCES)][: 12 + i % 20], **kw}))
    return out


def _alone(client, kind, kw):
    if kind == "chat":
        choice = client.chat.completions.create(model=MODEL_NAME, **kw).choices[0]
        return choice.message.content, choice.finish_reason
    choice = client.completions.create(model=MODEL_NAME, **kw).choices[0]
    return choice.text, choice.finish_reason


def _streamed(client, kind, kw):
    text, finish = "", None
    if kind == "chat":
        for chunk in client.chat.completions.create(model=MODEL_NAME, stream=True, **kw):
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
    else:
        for chunk in client.completions.create(model=MODEL_NAME, stream=True, **kw):
            for c in chunk.choices:
                text += c.text
                finish = c.finish_reason or finish
    return text, finish


def test_concurrent_streams_equal_requests_run_alone(server):
    client = server.openai()
    requests = _requests()
    alone = [_alone(client, kind, kw) for kind, kw in requests]
    assert all(finish in ("stop", "length") for _, finish in alone)
    with ThreadPoolExecutor(CLIENTS) as pool:
        # each thread gets its own client (connection pool), as separate programs would
        clients = [server.openai() for _ in range(CLIENTS)]
        futures = [pool.submit(_streamed, clients[i % CLIENTS], kind, kw) for i, (kind, kw) in enumerate(requests)]
        together = [f.result(timeout=120) for f in futures]
    assert len(together) == REQUESTS
    mismatches = [(i, a, t) for i, (a, t) in enumerate(zip(alone, together, strict=True)) if a != t]
    assert not mismatches, mismatches[:3]
    assert server.worker.queue_length == 0


def test_concurrent_streams_with_swapping_all_complete(tiny_checkpoint):
    """With the resident set moving (swaps between and during requests), nothing is lost either."""
    from swapmoe.server import ServerConfig
    from tests.server.conftest import running_server

    with running_server(tiny_checkpoint, ServerConfig(model_name=MODEL_NAME, max_queue=16),
                        update_interval=2, swaps_per_update=1) as srv:
        clients = [srv.openai() for _ in range(8)]
        kw = {"prompt": SENTENCES[3], "max_tokens": 10, "temperature": 0}
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda c: _streamed(c, "completion", kw), clients * 2))
        assert len(results) == 16 and all(finish == "length" and text for text, finish in results)
        assert srv.model.swapmoe.stats()["total"]["swaps"] > 0
