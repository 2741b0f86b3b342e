"""``swapmoe serve``: an OpenAI-compatible HTTP server over the batch-1 engine (see docs/server.md).

    from swapmoe.server import ServerConfig, create_app, serve
    app = create_app(model, tokenizer, ServerConfig(model_name="ref-moe"))   # a FastAPI app
    serve(app, host="127.0.0.1", port=8000)                                  # blocks (uvicorn)
"""

from __future__ import annotations

from typing import Any

from swapmoe.server.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app", "serve"]


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
