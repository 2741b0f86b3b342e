"""Differences between the transformers releases swapmoe runs on (5.17 on the GPU machine, 5.24 today).

Each helper answers one question by looking at the installed release (a signature, an attribute), not
at its version number, so a backport or a release between the two is handled the same way. The drift
canaries in tests/test_drift.py check that the answers still hold.
"""

from __future__ import annotations

import inspect
from typing import Any


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword that passes a KV cache to ``model``'s forward: ``{"cache": cache}`` or
    ``{"past_key_values": cache}``.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns and goes in 5.40);
    5.17 knows only ``past_key_values``. The renamed forward still accepts the old name through a
    decorator, whose ``functools.wraps`` exposes the new signature, so the signature tells them apart.
    """
    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}
