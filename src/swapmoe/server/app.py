"""The FastAPI application: OpenAI-compatible endpoints over one :class:`EngineWorker`.

``create_app(model, tokenizer, ServerConfig(...))`` builds an app holding all of its state (engine
worker, metrics registry, caches) on itself: nothing is global, so several apps can live in one
process. The worker thread starts and stops with the app's lifespan.

Flow of a generation request: check the API key (before anything else, unknown paths included) ->
read the body (JSON media type, size limit, read deadline) -> on a worker thread: parse (UTF-8, JSON,
schema), check the model name, refuse a prompt whose byte length alone rules it out, tokenise and
check lengths against the context -> submit to the engine worker (429 when the queue is full) ->
stream the events as server-sent events, or collect them into one body (rendered on a worker thread).
A client that goes away cancels its job (a waiting job never runs; a running one stops before its
next token). On shutdown (:meth:`_Server.drain`) waiting requests get 503 and a running one finishes
within the grace period or ends with a last chunk and ``[DONE]``.

The event loop only moves bytes: every step whose cost grows with the request runs on a thread, so
``/health`` and streaming clients keep their latency while a large request is parsed or refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import Receive, Scope, Send

from swapmoe.engine.decoder import prime_compiled_step
from swapmoe.engine.generate import FINISH_CANCELLED, context_length, stop_token_ids
from swapmoe.engine.sampling import SamplingParams
from swapmoe.engine.worker import EngineWorker, QueueFullError, WorkerClosedError
from swapmoe.families import require_causal_lm
from swapmoe.hostmem import return_freed_memory
from swapmoe.server.body import PromptBytes, is_json_media_type, parse_body
from swapmoe.server.chat import chat_prompt
from swapmoe.server.errors import APIError, install_handlers
from swapmoe.server.guard import Guard
from swapmoe.server.metrics import ServerMetrics
from swapmoe.server.protocol import ChatCompletionRequest, CompletionRequest, stop_list
from swapmoe.server.render import ChatRenderer, CompletionRenderer
from swapmoe.server.resident import MODES, ResidentSetControl
from swapmoe.server.responses import FINISH_SHUTDOWN, ChoiceState, TokenStrings, prompt_entries
from swapmoe.server.runner import PreparedRequest, PromptDone, RunningRequest, TimeLimitError, TokenOut

logger = logging.getLogger("swapmoe.server")

# Completions without max_tokens generate at most this many tokens (OpenAI's legacy default).
DEFAULT_COMPLETION_TOKENS = 16
# Largest max_tokens when the model config states no context length.
FALLBACK_MAX_TOKENS = 8192
# Seeds are taken modulo 2**64, the range torch.Generator.manual_seed accepts.
_SEED_MODULUS = 2**64
# Bodies above this size are prepared one at a time (their parsing and tokenising buffers are what
# grows memory), and freed memory is handed back to the system after each.
LARGE_BODY_BYTES = 256 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """How the server behaves.

    model_name      the name clients use (``model`` field, ``/v1/models``)
    api_key         when set, every request needs ``Authorization: Bearer <api_key>``
    max_queue       requests that may wait while one runs; beyond it: 429 with Retry-After
    time_limit      seconds one request may run on the engine (None: no limit); a generation that
                    reaches it ends with finish_reason "length"
    max_body_bytes  largest request body accepted (413 above)
    header_timeout  seconds for a request head to arrive (408 and closed after; applied by
                    :func:`swapmoe.server.serve`, which runs the server's HTTP protocol)
    body_timeout    seconds for a request body to arrive once its head has (408 after)
    shutdown_grace  seconds a running generation may go on after a shutdown begins; then it ends
                    with a last chunk (finish_reason "length") and ``[DONE]``
    resident_set    "adaptive" (the set follows the text served: SwapMoE), "fixed" (held after the
                    warm-up) or "reset" (every request starts from the warm-up's state); with "fixed"
                    and "reset" the same request gives the same answer; see resident.py
    warmup_tokens   with "fixed" or "reset": tokens served before the set is held
    warmup_text     text run through the model at start-up, before serving
    """

    model_name: str = "swapmoe"
    api_key: str | None = None
    max_queue: int = 16
    time_limit: float | None = 300.0
    max_body_bytes: int = 8 * 1024 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    shutdown_grace: float = 5.0
    resident_set: str = "adaptive"
    warmup_tokens: int = 0
    warmup_text: str | None = None

    def __post_init__(self) -> None:
        if self.header_timeout <= 0 or self.body_timeout <= 0:
            raise ValueError("header_timeout and body_timeout must be > 0")
        if self.shutdown_grace < 0:
            raise ValueError("shutdown_grace must be >= 0")
        if self.resident_set not in MODES:
            raise ValueError(f"resident_set must be one of {MODES}, got {self.resident_set!r}")
        if self.warmup_tokens < 0:
            raise ValueError("warmup_tokens must be >= 0")


class EventStreamResponse(StreamingResponse):
    """Server-sent events that stop as soon as the client disconnects, whatever the ASGI version.

    (Starlette listens for the disconnect only below ASGI spec 2.4; here it always does, and
    cancelling the body iterator cancels its engine job.) ``on_close`` runs however the response
    ends, also when the client left before the body iterator was first entered (its own ``finally``
    would then never run).
    """

    media_type = "text/event-stream"

    def __init__(self, content: Any, *, on_close: Any = None, **kw: Any) -> None:
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            if self.on_close is not None:
                self.on_close()


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


@dataclass
class _Plan:
    """A request ready for the engine: what the worker thread hands back to the event loop."""

    req: PreparedRequest
    renderer: CompletionRenderer | ChatRenderer
    stream: bool
    endpoint: str


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
        self.prompt_bytes = PromptBytes(tokenizer)
        self.resident = ResidentSetControl(model, tokenizer, config.resident_set, config.warmup_tokens,
                                           config.warmup_text)
        self.created = int(time.time())
        self.active: set[RunningRequest] = set()
        self.draining = False
        # one large body prepared at a time: bounds the memory parsing and tokenising can take
        # (made on first use, inside the event loop it belongs to)
        self.large_bodies: anyio.CapacityLimiter | None = None

    # -------------------------------------------------------------- input
    async def read_body(self, request: Request) -> bytes:
        """The body, after the checks that need no parsing: media type, size, read deadline."""
        if not is_json_media_type(request.headers.get("content-type")):
            got = request.headers.get("content-type")
            raise APIError(415, "Content-Type must be application/json (got "
                           f"{repr(got) if got else 'none'}); with curl add -H 'Content-Type: application/json'",
                           code="unsupported_media_type")
        # Past the size limit the rest of the body is read and dropped by the protocol (closing at once,
        # with the client still sending, would reset the connection and lose the answer); the body
        # deadline of the protocol bounds how long that goes on.
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.config.max_body_bytes:
            raise APIError(413, f"request body larger than {self.config.max_body_bytes} bytes")
        raw = bytearray()
        try:
            with anyio.fail_after(self.config.body_timeout):
                async for chunk in request.stream():
                    raw += chunk
                    if len(raw) > self.config.max_body_bytes:
                        raise APIError(413, f"request body larger than {self.config.max_body_bytes} bytes")
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.config.body_timeout:g} s "
                           f"({len(raw)} bytes came)", code="body_timeout", headers={"Connection": "close"}) from None
        return bytes(raw)

    async def prepare(self, request: Request, build: Any) -> _Plan:
        """``build(raw)`` on a worker thread: parsing and tokenising never hold up the event loop."""
        raw = await self.read_body(request)
        if len(raw) <= LARGE_BODY_BYTES:
            return await anyio.to_thread.run_sync(build, raw)
        if self.large_bodies is None:
            self.large_bodies = anyio.CapacityLimiter(1)
        try:
            return await anyio.to_thread.run_sync(build, raw, limiter=self.large_bodies)
        except APIError as e:
            raise e.with_traceback(None) from None  # its frames hold the parsed body: let it go now
        finally:
            del raw
            await anyio.to_thread.run_sync(return_freed_memory)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(404, f"The model `{name}` does not exist: this server serves "
                           f"`{self.config.model_name}`", param="model", code="model_not_found")

    def check_size(self, text: str, param: str) -> None:
        """Refuse, before tokenising, a text whose byte length alone rules out the context."""
        if self.context is None:
            return
        least = self.prompt_bytes.min_tokens(text)
        if least > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, your "
                           f"prompt has at least {least} tokens ({len(text.encode('utf-8'))} bytes of text, at "
                           f"most {self.prompt_bytes.bytes_per_token} bytes per token).", param=param,
                           code="context_length_exceeded")

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            self.check_size(prompt, "prompt")
            ids = list(self.tokenizer(prompt).input_ids)
        else:
            if self.context is not None and len(prompt) > self.context:
                self.max_tokens([prompt], 0, None)  # the context-length error, before the vocabulary check
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

    def sampling(self, body: CompletionRequest | ChatCompletionRequest, max_tokens: int, stops: tuple[str, ...],
                 logprobs: int | None) -> SamplingParams:
        seed = None if body.seed is None else body.seed % _SEED_MODULUS
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=seed,
                              stop=stops, logprobs=logprobs)

    def build_completion(self, raw: bytes) -> _Plan:
        """Worker thread: ``POST /v1/completions`` body -> tokenised request and its renderer."""
        body: CompletionRequest = parse_body(raw, CompletionRequest)
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
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        renderer = CompletionRenderer(self.config.model_name, self.strings, logprobs=body.logprobs is not None,
                                      echo_texts=echo_texts, include_usage=include_usage)
        return _Plan(PreparedRequest(prompts, params, score), renderer, body.stream, "completions")

    def build_chat(self, raw: bytes) -> _Plan:
        """Worker thread: ``POST /v1/chat/completions`` body -> tokenised request and its renderer."""
        body: ChatCompletionRequest = parse_body(raw, ChatCompletionRequest)
        self.check_model(body.model)
        prompt = chat_prompt(self.tokenizer, body.messages, check=lambda text: self.check_size(text, "messages"))
        if not prompt.token_ids:
            raise APIError(400, "the messages render to an empty prompt", param="messages")
        max_tokens = self.max_tokens([prompt.token_ids], body.token_limit(), None)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sampling(body, max_tokens, stop_list(body.stop) + prompt.extra_stops, logprobs)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        renderer = ChatRenderer(self.config.model_name, self.strings, logprobs=body.logprobs,
                                include_usage=include_usage)
        return _Plan(PreparedRequest([prompt.token_ids], params), renderer, body.stream, "chat")

    def submit(self, req: PreparedRequest) -> RunningRequest:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Connection": "close"})
        try:
            run = RunningRequest(self.worker, self.model, self.tokenizer, req, self.stop_ids,
                                 after=self.resident.after_request, before=self.resident.before_request)
        except QueueFullError as e:
            raise APIError(429, f"The server is busy: {e}; retry after {e.retry_after} s.",
                           code="queue_full", headers={"Retry-After": str(e.retry_after)}) from None
        except WorkerClosedError as e:
            raise APIError(503, str(e), code="shutting_down") from None
        self.active.add(run)
        run.job.future.add_done_callback(lambda _f: self.active.discard(run))
        return run

    # ---------------------------------------------------------- execution
    def conclude(self, run: RunningRequest, endpoint: str, reason: str) -> None:
        """Count a request that ended without its last prompt's finish event (once per request)."""
        if run.concluded:
            return
        run.concluded = True
        self.metrics.finished.labels(endpoint, reason).inc()
        self.metrics.duration.observe(time.monotonic() - run.arrival)

    def failure(self, e: BaseException, endpoint: str, run: RunningRequest) -> APIError:
        self.conclude(run, endpoint, "error")
        if isinstance(e, TimeLimitError):
            return APIError(503, f"{e} (the limit is {self.config.time_limit} s per request)", code="timeout")
        if isinstance(e, WorkerClosedError):
            return APIError(503, str(e), code="shutting_down")
        logger.error("generation failed", exc_info=e)
        return APIError(500, f"generation failed: {type(e).__name__}: {e}", code="generation_error")

    def stopped(self, run: RunningRequest, endpoint: str) -> Response:
        """A request whose job ended before it produced anything: its client left, or a shutdown."""
        if run.stopped_by_server:
            self.conclude(run, endpoint, FINISH_SHUTDOWN)
            raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Connection": "close"})
        self.conclude(run, endpoint, FINISH_CANCELLED)
        return Response(status_code=499)  # the client is gone; nobody reads this

    def track(self, run: RunningRequest, req: PreparedRequest, endpoint: str,
              item: PromptDone | TokenOut, last: dict[int, float]) -> PromptDone | TokenOut:
        """Metrics for one event (``last`` keeps the previous token's time per prompt); the event as the
        client sees it (a cancellation by a shutdown is a truncation)."""
        m = self.metrics
        if isinstance(item, PromptDone):
            m.prompt_tokens.inc(len(req.prompts[item.index]))
            if item.index == 0 and run.queue_wait() is not None:
                m.queue_wait.observe(run.queue_wait())
            return item
        event = item.event
        if event.finish_reason == FINISH_CANCELLED and run.stopped_by_server:
            item = TokenOut(item.index, dataclasses.replace(event, finish_reason=FINISH_SHUTDOWN), item.time)
            event = item.event
        if event.token_id is not None:
            m.generation_tokens.inc()
            if not last:
                m.ttft.observe(item.time - run.arrival)
            elif item.index in last:
                m.tpot.observe(item.time - last[item.index])
            last[item.index] = item.time
        if event.finish_reason is not None and not run.concluded:
            m.finished.labels(endpoint, event.finish_reason).inc()
            # the job ends here: the last prompt finished, or a cancellation stops the rest
            if item.index == len(req.prompts) - 1 or event.finish_reason in (FINISH_CANCELLED, FINISH_SHUTDOWN):
                run.concluded = True
                m.duration.observe(item.time - run.arrival)
        return item

    async def _cancel_on_disconnect(self, request: Request, run: RunningRequest) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                run.cancel()
                return

    async def collect(self, request: Request, run: RunningRequest, plan: _Plan) -> Response:
        req, endpoint = plan.req, plan.endpoint
        choices = [ChoiceState(i) for i in range(len(req.prompts))]
        last: dict[int, float] = {}
        watcher = asyncio.ensure_future(self._cancel_on_disconnect(request, run))
        try:
            async for item in run.events():
                item = self.track(run, req, endpoint, item, last)
                if isinstance(item, PromptDone):
                    if item.scores is not None:
                        choices[item.index].prompt_entries = prompt_entries(item.scores)
                elif item.event.finish_reason == FINISH_CANCELLED:
                    return Response(status_code=499)  # the client is gone; nobody reads this
                else:
                    choices[item.index].add(item.event)
        except Exception as e:
            raise self.failure(e, endpoint, run) from None
        finally:
            watcher.cancel()
        if any(c.finish_reason is None for c in choices):  # cancelled while it waited, or prompts left unrun
            return self.stopped(run, endpoint)

        def render() -> bytes:  # a worker thread: 64 echoed prompts with logprobs make a big body
            body = plan.renderer.response(choices, sum(len(p) for p in req.prompts))
            return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

        return Response(await anyio.to_thread.run_sync(render), media_type="application/json")

    async def stream(self, request: Request, run: RunningRequest, plan: _Plan) -> Response:
        req, endpoint, renderer = plan.req, plan.endpoint, plan.renderer
        events = run.events()
        last: dict[int, float] = {}
        # Wait for the prompt to go through the model before answering 200: a request that fails
        # that early (or waits in the queue and is abandoned) still gets a proper status.
        watcher = asyncio.ensure_future(self._cancel_on_disconnect(request, run))
        try:
            first = await anext(events)
        except StopAsyncIteration:
            return self.stopped(run, endpoint)
        except Exception as e:
            raise self.failure(e, endpoint, run) from None
        finally:
            watcher.cancel()

        async def body() -> AsyncIterator[str]:
            completion_tokens = 0
            try:
                item: PromptDone | TokenOut = first
                while True:
                    item = self.track(run, req, endpoint, item, last)
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
                yield _sse(self.failure(e, endpoint, run).body())
            yield _sse("[DONE]")

        def close() -> None:
            # the client went away mid-stream (the body was not run to its end): count it as cancelled
            self.conclude(run, endpoint, FINISH_SHUTDOWN if run.stopped_by_server else FINISH_CANCELLED)
            run.cancel()  # a no-op when the job is done; stops it when the client went away

        return EventStreamResponse(body(), on_close=close,
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def generate(self, request: Request, build: Any) -> Response:
        plan = await self.prepare(request, build)
        run = self.submit(plan.req)
        if plan.stream:
            return await self.stream(request, run, plan)
        return await self.collect(request, run, plan)

    # ----------------------------------------------------------- shutdown
    async def drain(self) -> None:
        """Shutdown: new and waiting requests get 503; a running one may finish within the grace period,
        then it is stopped (a stream ends with a last chunk and ``[DONE]``)."""
        self.draining = True
        for run in list(self.active):
            if not run.started:
                run.stop_by_server()
        deadline = time.monotonic() + self.config.shutdown_grace
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for run in list(self.active):
            run.stop_by_server()

    # ----------------------------------------------------------- endpoints
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        card: dict[str, Any] = {"id": self.config.model_name, "object": "model", "created": self.created,
                                "owned_by": "swapmoe"}
        if self.context is not None:
            card["max_model_len"] = self.context
        return card


def create_app(model: Any, tokenizer: Any, config: ServerConfig | None = None) -> FastAPI:
    """An OpenAI-compatible app serving ``model`` (any transformers causal LM) with ``tokenizer``."""
    require_causal_lm(model, "the OpenAI server")
    config = config or ServerConfig()
    server = _Server(model, tokenizer, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.worker.start()
        try:
            # a compiled decode step is compiled before the first request, at the one cache size every
            # request will use; then the warm-up (if any); both on the engine thread
            await asyncio.wrap_future(server.worker.submit(lambda _ctx: prime_compiled_step(server.model)).future)
            await asyncio.wrap_future(server.worker.submit(server.resident.start).future)
            yield
        finally:
            server.draining = True
            server.worker.close()

    app = FastAPI(title="swapmoe", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    install_handlers(app)
    app.add_middleware(Guard, server=server)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.generate(request, server.build_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.generate(request, server.build_chat)

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models() -> dict[str, Any]:
        return server.models()

    @app.api_route("/v1/models/{name:path}", methods=["GET", "HEAD"])
    async def model(name: str) -> dict[str, Any]:
        server.check_model(name)
        return server.model_card()

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict[str, Any]:
        return {"status": "shutting_down" if server.draining else "ok", "model": config.model_name,
                "queue_length": server.worker.queue_length, "busy": server.worker.busy,
                "resident_set": server.resident.state}

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
