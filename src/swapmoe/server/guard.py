"""The outermost ASGI layer of the server: API key before routing, request counting, and one clean
answer (an OpenAI error object) for anything that goes wrong below it."""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from swapmoe.server.errors import error_body

logger = logging.getLogger("swapmoe.server")

# the endpoints counted under their own label in swapmoe_http_requests_total (the rest: "other")
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def _endpoint_label(path: str) -> str:
    if path in ENDPOINTS:
        return path
    return "/v1/models/{name}" if path.startswith("/v1/models/") else "other"


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


class Guard:
    """Outermost ASGI layer of the app (inside Starlette's error middleware).

    * checks the API key before routing, so an unknown path or method gets 401 without the key;
    * counts answered HTTP requests by endpoint and status (streams included; a client that left
      before its answer counts as 499);
    * answers an unexpected exception with one OpenAI error object (500) and one log entry with its
      traceback, instead of Starlette's text/plain 500 re-raised into uvicorn's log (two tracebacks);
      a client that disconnected is not an error and is not logged.
    """

    def __init__(self, app: Any, server: Any) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"code": None, "gone": False}

        async def receive_and_note() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                state["gone"] = True
            return message

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["code"] = message["status"]
            await send(message)

        try:
            key = self.server.config.api_key
            if key is not None and not _key_matches(scope, key):
                await _send_json(send_and_note, 401, error_body(
                    401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'.",
                    code="invalid_api_key"), {"WWW-Authenticate": "Bearer"})
                return
            await self.app(scope, receive_and_note, send_and_note)
        except ClientDisconnect:  # it left while sending its body: nothing to answer, nothing to log
            state["gone"] = True
        except Exception as e:
            if state["code"] is None:
                logger.error("internal error on %s %s", scope.get("method"), scope.get("path"), exc_info=e)
                await _send_json(send_and_note, 500, error_body(500, f"internal server error: {type(e).__name__}: {e}"))
            else:  # the answer had begun: nothing to send, the connection is closed
                logger.error("internal error on %s %s after the answer began", scope.get("method"),
                             scope.get("path"), exc_info=e)
        finally:
            code = state["code"] if state["code"] is not None else (499 if state["gone"] else 500)
            self.server.metrics.http_requests.labels(_endpoint_label(scope.get("path", "")), str(code)).inc()


def _key_matches(scope: Scope, key: str) -> bool:
    header = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
