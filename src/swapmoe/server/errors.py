"""OpenAI-style error objects: ``{"error": {"message", "type", "param", "code"}}`` with a status.

Every failure the server answers (bad input, unknown model, full queue, missing key, a crash inside
generation) goes through :class:`APIError` (an unexpected exception is answered by the app's outermost
layer, ``_Guard`` in :mod:`swapmoe.server.app`, with the same object), so clients such as the ``openai`` package raise the
matching exception class (``BadRequestError``, ``RateLimitError``, ...) with a readable message.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def from_validation_error(e: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field."""
    first = e.errors(include_url=False)[0]
    param = ".".join(str(x) for x in first["loc"]) or None
    kind = first["type"]
    # our own checks raise ValueError with a sentence for the user: no "Value error, " in front
    reason = str(first["ctx"]["error"]) if kind == "value_error" and "ctx" in first else first["msg"]
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        reason = "Input should be a JSON object"
    if kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif kind == "missing":
        message = f"Missing required parameter: {param}"
    else:
        message = f"Invalid value for {param}: {reason}" if param else reason
    if len(e.errors()) > 1:
        message += f" (and {len(e.errors()) - 1} more problem(s))"
    return APIError(400, message, param=param, code=kind)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))
