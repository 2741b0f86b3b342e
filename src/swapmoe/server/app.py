"""The FastAPI application: OpenAI-compatible endpoints over one :class:`EngineWorker`.

``create_app(model, tokenizer, ServerConfig(...))`` builds an app holding all of its state (engine
worker, metrics registry, caches) on itself: nothing is global, so several apps can live in one
process. The worker thread starts and stops with the app's lifespan.

Flow of a generation request: read the body (size limit, UTF-8, JSON, schema) -> check the model name
-> tokenise and check lengths against the context -> submit to the worker (429 when the queue is
full) -> stream the events as server-sent events, or collect them into one body. A client that goes
away cancels its job (a waiting job never runs; a running one stops before its next token).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope, Send

from swapmoe.engine.generate import FINISH_CANCELLED, context_length, stop_token_ids
from swapmoe.engine.sampling import SamplingParams
from swapmoe.engine.worker import EngineWorker, QueueFullError, WorkerClosedError
from swapmoe.families import require_causal_lm
from swapmoe.server.chat import chat_prompt
from swapmoe.server.errors import APIError, from_validation_error, install_handlers
from swapmoe.server.metrics import ServerMetrics
from swapmoe.server.protocol import ChatCompletionRequest, CompletionRequest, stop_list
from swapmoe.server.render import ChatRenderer, CompletionRenderer
from swapmoe.server.responses import ChoiceState, TokenStrings, prompt_entries
from swapmoe.server.runner import PreparedRequest, PromptDone, RunningRequest, TimeLimitError, TokenOut

logger = logging.getLogger("swapmoe.server")

# Completions without max_tokens generate at most this many tokens (OpenAI's legacy default).
DEFAULT_COMPLETION_TOKENS = 16
# Largest max_tokens when the model config states no context length.
FALLBACK_MAX_TOKENS = 8192
# Seeds are taken modulo 2**64, the range torch.Generator.manual_seed accepts.
_SEED_MODULUS = 2**64
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


@dataclass(frozen=True)
class ServerConfig:
    """How the server behaves.

    model_name      the name clients use (``model`` field, ``/v1/models``)
    api_key         when set, every request needs ``Authorization: Bearer <api_key>``
    max_queue       requests that may wait while one runs; beyond it: 429 with Retry-After
    time_limit      seconds one request may run on the engine (None: no limit); a generation that
                    reaches it ends with finish_reason "length"
    max_body_bytes  largest request body accepted (413 above)
    """

    model_name: str = "swapmoe"
    api_key: str | None = None
    max_queue: int = 16
    time_limit: float | None = 300.0
    max_body_bytes: int = 8 * 1024 * 1024


class EventStreamResponse(StreamingResponse):
    """Server-sent events that stop as soon as the client disconnects, whatever the ASGI version.

    (Starlette listens for the disconnect only below ASGI spec 2.4; here it always does, and
    cancelling the body iterator cancels its engine job.)
    """

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def stream() -> None:
                with contextlib.suppress(OSError):
                    await self.stream_response(send)
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()


def _unpaired_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string (or key) in parsed JSON that UTF-8 cannot encode, else None.

    JSON escapes can carry lone surrogates (``"\\ud800"``); they would fail later in the tokenizer or
    when the answer is encoded, so they are refused up front.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = _unpaired_surrogate(key, path) if isinstance(key, str) else None
            where = where if where is not None else _unpaired_surrogate(item, f"{path}.{key}" if path else key)
            if where is not None:
                return where
    elif isinstance(value, list):
        for i, item in enumerate(value):
            where = _unpaired_surrogate(item, f"{path}.{i}")
            if where is not None:
                return where
    return None


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class _Server:
    """Everything one app needs, kept on ``app.state.server``."""

    def __init__(self, model: Any, tokenizer: Any, config: ServerConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.worker = EngineWorker(model, max_queue=config.max_queue, time_limit=config.time_limit)
        self.metrics = ServerMetrics(lambda: self.worker.queue_length, lambda: self.worker.busy, self.worker.stats)
        self.strings = TokenStrings(tokenizer)
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.context = context_length(model)
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.created = int(time.time())

    # -------------------------------------------------------------- input
    async def read(self, request: Request, schema: type[BaseModel]) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.config.max_body_bytes:
            raise APIError(413, f"request body larger than {self.config.max_body_bytes} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.config.max_body_bytes:
                raise APIError(413, f"request body larger than {self.config.max_body_bytes} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise APIError(400, f"request body is not valid UTF-8 (byte {e.start})", code="invalid_utf8") from None
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        where = _unpaired_surrogate(data)
        if where is not None:
            raise APIError(400, f"{where or 'a key'}: text is not valid Unicode (an unpaired surrogate "
                           "such as \\ud800)", param=where or None, code="invalid_unicode")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            raise from_validation_error(e) from None

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(404, f"The model `{name}` does not exist: this server serves "
                           f"`{self.config.model_name}`", param="model", code="model_not_found")

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = list(self.tokenizer(prompt).input_ids)
        else:
            bad = [t for t in prompt if t >= self.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})",
                               param="prompt")
            ids = list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty (it encodes to no tokens)", param="prompt")
        return ids

    def max_tokens(self, prompts: list[list[int]], requested: int | None, default: int | None) -> int:
        """``requested`` if every prompt has room for it in the context, else a 400 saying so."""
        longest = max(len(p) for p in prompts)
        limit = self.context if self.context is not None else longest + FALLBACK_MAX_TOKENS
        room = limit - longest
        if room < 0 or (room == 0 and requested != 0):
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt "
                           f"has {longest} tokens, which leaves no room to generate.", param="prompt",
                           code="context_length_exceeded")
        if requested is None:
            return room if default is None else min(default, room)
        if requested > room:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you "
                           f"requested {longest + requested} tokens ({longest} in the prompt, {requested} "
                           "for the completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        return requested

    def submit(self, req: PreparedRequest) -> RunningRequest:
        try:
            return RunningRequest(self.worker, self.model, self.tokenizer, req, self.stop_ids)
        except QueueFullError as e:
            raise APIError(429, f"The server is busy: {e}; retry after {e.retry_after} s.",
                           code="queue_full", headers={"Retry-After": str(e.retry_after)}) from None
        except WorkerClosedError as e:
            raise APIError(503, str(e), code="shutting_down") from None

    # ---------------------------------------------------------- execution
    def failure(self, e: BaseException, endpoint: str) -> APIError:
        self.metrics.finished.labels(endpoint, "error").inc()
        if isinstance(e, TimeLimitError):
            return APIError(503, f"{e} (the limit is {self.config.time_limit} s per request)", code="timeout")
        if isinstance(e, WorkerClosedError):
            return APIError(503, str(e), code="shutting_down")
        logger.error("generation failed", exc_info=e)
        return APIError(500, f"generation failed: {type(e).__name__}: {e}", code="generation_error")

    def track(self, run: RunningRequest, req: PreparedRequest, endpoint: str,
              item: PromptDone | TokenOut, last: dict[int, float]) -> None:
        """Metrics for one event (``last`` keeps the previous token's time per prompt)."""
        m = self.metrics
        if isinstance(item, PromptDone):
            m.prompt_tokens.inc(len(req.prompts[item.index]))
            if item.index == 0 and run.queue_wait() is not None:
                m.queue_wait.observe(run.queue_wait())
            return
        event = item.event
        if event.token_id is not None:
            m.generation_tokens.inc()
            if not last:
                m.ttft.observe(item.time - run.arrival)
            elif item.index in last:
                m.tpot.observe(item.time - last[item.index])
            last[item.index] = item.time
        if event.finish_reason is not None:
            m.finished.labels(endpoint, event.finish_reason).inc()
            if item.index == len(req.prompts) - 1:
                m.duration.observe(item.time - run.arrival)

    async def _cancel_on_disconnect(self, request: Request, run: RunningRequest) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                run.cancel()
                return

    async def collect(self, request: Request, run: RunningRequest, req: PreparedRequest, endpoint: str,
                      renderer: CompletionRenderer | ChatRenderer) -> Response:
        choices = [ChoiceState(i) for i in range(len(req.prompts))]
        last: dict[int, float] = {}
        watcher = asyncio.ensure_future(self._cancel_on_disconnect(request, run))
        try:
            async for item in run.events():
                self.track(run, req, endpoint, item, last)
                if isinstance(item, PromptDone):
                    if item.scores is not None:
                        choices[item.index].prompt_entries = prompt_entries(item.scores)
                elif item.event.finish_reason == FINISH_CANCELLED:
                    return Response(status_code=499)  # the client is gone; nobody reads this
                else:
                    choices[item.index].add(item.event)
        except Exception as e:
            raise self.failure(e, endpoint) from None
        finally:
            watcher.cancel()
        if any(c.finish_reason is None for c in choices):  # cancelled while it waited
            return Response(status_code=499)
        body = renderer.response(choices, sum(len(p) for p in req.prompts))
        return JSONResponse(body)

    async def stream(self, request: Request, run: RunningRequest, req: PreparedRequest, endpoint: str,
                     renderer: CompletionRenderer | ChatRenderer) -> Response:
        events = run.events()
        last: dict[int, float] = {}
        # Wait for the prompt to go through the model before answering 200: a request that fails
        # that early (or waits in the queue and is abandoned) still gets a proper status.
        watcher = asyncio.ensure_future(self._cancel_on_disconnect(request, run))
        try:
            first = await anext(events)
        except StopAsyncIteration:
            return Response(status_code=499)
        except Exception as e:
            raise self.failure(e, endpoint) from None
        finally:
            watcher.cancel()

        async def body() -> AsyncIterator[str]:
            completion_tokens = 0
            try:
                item: PromptDone | TokenOut = first
                while True:
                    self.track(run, req, endpoint, item, last)
                    if isinstance(item, PromptDone):
                        chunks = renderer.on_prompt(item)
                    else:
                        completion_tokens += item.event.token_id is not None
                        chunks = renderer.on_token(item)
                    for chunk in chunks:
                        yield _sse(chunk)
                    try:
                        item = await anext(events)
                    except StopAsyncIteration:
                        break
                for chunk in renderer.on_end(sum(len(p) for p in req.prompts), completion_tokens):
                    yield _sse(chunk)
            except Exception as e:
                yield _sse(self.failure(e, endpoint).body())
            finally:
                run.cancel()  # a no-op when the job is done; stops it when the client went away
            yield _sse("[DONE]")

        return EventStreamResponse(body(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def run(self, request: Request, req: PreparedRequest, endpoint: str, stream: bool,
                  renderer: CompletionRenderer | ChatRenderer) -> Response:
        run = self.submit(req)
        if stream:
            return await self.stream(request, run, req, endpoint, renderer)
        return await self.collect(request, run, req, endpoint, renderer)

    # ----------------------------------------------------------- endpoints
    def sampling(self, body: CompletionRequest | ChatCompletionRequest, max_tokens: int, stops: tuple[str, ...],
                 logprobs: int | None) -> SamplingParams:
        seed = None if body.seed is None else body.seed % _SEED_MODULUS
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=seed,
                              stop=stops, logprobs=logprobs)

    async def completions(self, request: Request) -> Response:
        body: CompletionRequest = await self.read(request, CompletionRequest)
        self.check_model(body.model)
        raw_prompts = body.prompts()
        prompts = [self.encode(p) for p in raw_prompts]
        max_tokens = self.max_tokens(prompts, body.max_tokens, DEFAULT_COMPLETION_TOKENS)
        params = self.sampling(body, max_tokens, stop_list(body.stop), body.logprobs)
        score = body.logprobs if body.echo and body.logprobs is not None else None
        echo_texts = None
        if body.echo:
            echo_texts = [p if isinstance(p, str) else self.tokenizer.decode(p, skip_special_tokens=False)
                          for p in raw_prompts]
        req = PreparedRequest(prompts, params, score)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        renderer = CompletionRenderer(self.config.model_name, self.strings, logprobs=body.logprobs is not None,
                                      echo_texts=echo_texts, include_usage=include_usage)
        return await self.run(request, req, "completions", body.stream, renderer)

    async def chat(self, request: Request) -> Response:
        body: ChatCompletionRequest = await self.read(request, ChatCompletionRequest)
        self.check_model(body.model)
        prompt = chat_prompt(self.tokenizer, body.messages)
        if not prompt.token_ids:
            raise APIError(400, "the messages render to an empty prompt", param="messages")
        max_tokens = self.max_tokens([prompt.token_ids], body.token_limit(), None)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sampling(body, max_tokens, stop_list(body.stop) + prompt.extra_stops, logprobs)
        req = PreparedRequest([prompt.token_ids], params)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        renderer = ChatRenderer(self.config.model_name, self.strings, logprobs=body.logprobs,
                                include_usage=include_usage)
        return await self.run(request, req, "chat", body.stream, renderer)

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        card: dict[str, Any] = {"id": self.config.model_name, "object": "model", "created": self.created,
                                "owned_by": "swapmoe"}
        if self.context is not None:
            card["max_model_len"] = self.context
        return card


class _CountRequests:
    """ASGI middleware counting answered HTTP requests by endpoint and status (streams included)."""

    def __init__(self, app: Any, server: _Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_and_note(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in ENDPOINTS else "other"
            self.server.metrics.http_requests.labels(endpoint, str(status["code"])).inc()


def create_app(model: Any, tokenizer: Any, config: ServerConfig | None = None) -> FastAPI:
    """An OpenAI-compatible app serving ``model`` (any transformers causal LM) with ``tokenizer``."""
    require_causal_lm(model, "the OpenAI server")
    config = config or ServerConfig()
    server = _Server(model, tokenizer, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.worker.start()
        try:
            yield
        finally:
            server.worker.close()

    async def require_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="swapmoe", lifespan=lifespan, dependencies=[Depends(require_key)],
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    install_handlers(app)
    app.add_middleware(_CountRequests, server=server)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.chat(request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return server.models()

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        server.check_model(name)
        return server.model_card()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_name, "queue_length": server.worker.queue_length,
                "busy": server.worker.busy}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
