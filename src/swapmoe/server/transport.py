"""What uvicorn does not do by itself: time limits on reading a request, and a shutdown that drains.

uvicorn (0.29 to 0.54) closes idle keep-alive connections (``timeout_keep_alive``) and bounds the
size of a request head (h11's incomplete-event limit), but a client may take as long as it likes to
send the head or the body: a connection trickling header bytes stays open forever. The protocol
class made by :func:`guarded_h11` closes such connections:

* ``header_timeout``: the request head (request line and headers) must arrive within this many
  seconds of the connection opening or of the first byte of the next request on it; else the server
  answers 408 and closes the connection.
* ``body_timeout``: the app answers 408 when a body is not complete within this many seconds (see
  ``_Server.read_body``); the protocol closes the connection a little later if the body is still
  incomplete then (a route that never reads its body, a body that trickles after the answer).

:class:`DrainingServer` is uvicorn's server with a shutdown hook: on SIGTERM or Ctrl-C it calls the
app's ``drain`` (answer waiting requests with 503, let a running generation finish within a grace
period, else end it cleanly) before uvicorn closes the connections.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

# Seconds the protocol waits, past the app's own body deadline, before it closes a connection whose
# body is still incomplete (the app's 408 goes out first).
BODY_BACKSTOP_S = 2.0


def _timeout_response(message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": "header_timeout"}}).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode("ascii") + body


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request head and a backstop for the body."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._seen_cycle: Any = None
        self._partial_head = False
        self._arm_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self._between_requests():
            self._arm_head()  # the first byte of the next request on a kept-alive connection
        self._partial_head = True
        super().data_received(data)
        self._after_events()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request
        self._after_events()

    # ------------------------------------------------------------ timers
    def _between_requests(self) -> bool:
        cycle = self.cycle
        return cycle is None or (cycle.response_complete and not cycle.more_body)

    def _arm_head(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_expired)

    def _after_events(self) -> None:
        cycle = self.cycle
        if cycle is not None and cycle is not self._seen_cycle:  # a request head was parsed
            self._seen_cycle = cycle
            self._partial_head = False
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            if self._body_timer is not None:
                self._body_timer.cancel()
            self._body_timer = self.loop.call_later(self.body_timeout + BODY_BACKSTOP_S, self._body_expired, cycle)
        if cycle is not None and not cycle.more_body and self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_timers(self) -> None:
        for timer in (getattr(self, "_head_timer", None), getattr(self, "_body_timer", None)):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._between_requests():
            return
        if self._partial_head:
            self.transport.write(_timeout_response(
                f"the request head did not arrive within {self.header_timeout:g} s"))
        self.transport.close()

    def _body_expired(self, cycle: Any) -> None:
        self._body_timer = None
        if cycle is self.cycle and cycle.more_body and not self.transport.is_closing():
            self.transport.close()  # the app's receive() now sees http.disconnect


def guarded_h11(header_timeout: float, body_timeout: float) -> type[H11Protocol]:
    """An h11 protocol class for ``uvicorn.Config(http=...)`` with these read deadlines (seconds)."""
    if header_timeout <= 0 or body_timeout <= 0:
        raise ValueError("header_timeout and body_timeout must be > 0")
    return type("GuardedH11Protocol", (_GuardedH11,), {"header_timeout": header_timeout,
                                                       "body_timeout": body_timeout})


class DrainingServer(uvicorn.Server):
    """uvicorn's server, calling ``drain()`` when a shutdown starts (SIGTERM, Ctrl-C, ``should_exit``)."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(config)
        self._drain = drain

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        task = asyncio.ensure_future(self._drain()) if self._drain is not None else None
        await asyncio.sleep(0)  # the drain marks the app as shutting down before connections are closed
        try:
            await super().shutdown(sockets)
        finally:
            if task is not None:
                task.cancel()


def make_server(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> DrainingServer:
    """A uvicorn server for an app from :func:`swapmoe.server.create_app`, with its read and shutdown limits.

    The limits come from the app's :class:`ServerConfig`; any other ASGI app gets uvicorn's defaults.
    """
    server = getattr(getattr(app, "state", None), "server", None)
    config = getattr(server, "config", None)
    kw: dict[str, Any] = {"timeout_graceful_shutdown": 5}
    if config is not None:
        kw["http"] = guarded_h11(config.header_timeout, config.body_timeout)
        # uvicorn cancels what is left after its own timeout: leave the drain time to end streams cleanly
        kw["timeout_graceful_shutdown"] = int(config.shutdown_grace) + 5
    uv_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, **kw)
    return DrainingServer(uv_config, drain=server.drain if server is not None else None)
