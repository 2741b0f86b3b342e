"""``swapmoe serve``: an OpenAI-compatible HTTP server over the batch-1 engine (see docs/server.md).

    from swapmoe.server import ServerConfig, create_app, serve
    app = create_app(model, tokenizer, ServerConfig(model_name="ref-moe"))   # a FastAPI app
    serve(app, host="127.0.0.1", port=8000)                                  # blocks (uvicorn)
"""

from __future__ import annotations

from typing import Any

from swapmoe.server.app import ServerConfig, create_app
from swapmoe.server.transport import make_server

__all__ = ["ServerConfig", "create_app", "make_server", "serve"]


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn until interrupted (SIGTERM or Ctrl-C drains it first: docs/server.md).

    The request head and body deadlines and the shutdown grace come from the app's ServerConfig.
    """
    make_server(app, host=host, port=port, log_level=log_level).run()
