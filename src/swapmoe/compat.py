"""Which transformers releases swapmoe is tested with (a warning outside them), and the differences
between them that swapmoe must bridge (answered by looking at the installed release, not its number).

swapmoe leans on transformers internals (the fused experts layout, the experts-kernel registry,
router output layouts, the loader's per-parameter hand-over; tests/test_drift.py names each one).
A release outside the tested range may have moved one of them, so importing swapmoe with it warns
once. The range is what CI runs (requirements/lock.txt) and what the GPU machine ships.
"""

from __future__ import annotations

import warnings

from packaging.version import Version

# Oldest and newest transformers releases the whole suite passed on (README "Set-up").
TESTED_TRANSFORMERS = ("5.17.0", "5.24.0")


def transformers_in_tested_range(version: str) -> bool:
    """True when ``version`` lies within :data:`TESTED_TRANSFORMERS` (pre-releases of a tested
    release count as untested)."""
    low, high = (Version(v) for v in TESTED_TRANSFORMERS)
    return low <= Version(version) <= high


def warn_if_untested_transformers(version: str) -> bool:
    """Warn (once per process, as Python's warnings do) when ``version`` is outside the tested range.

    Returns whether it warned, so the check itself can be tested.
    """
    if transformers_in_tested_range(version):
        return False
    low, high = TESTED_TRANSFORMERS
    warnings.warn(
        f"swapmoe is tested with transformers {low} to {high}; this is transformers {version}. "
        "It may work; if something breaks, install a tested release "
        f"(pip install 'transformers>={low},<={high}') or run 'make test-latest' to see what moved.",
        UserWarning,
        stacklevel=3,
    )
    return True


def cache_argument(model: object) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` from transformers 5.24 on
    (``past_key_values`` still works there, with a deprecation warning, until 5.40), ``past_key_values``
    before."""
    import inspect

    params = inspect.signature(model.forward).parameters  # type: ignore[attr-defined]
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: object, cache: object) -> dict[str, object]:
    """The keyword that passes a KV cache to ``model``'s forward: ``{"cache": cache}`` or
    ``{"past_key_values": cache}`` (see :func:`cache_argument`). The renamed forward of 5.24 still
    accepts the old name through a decorator whose ``functools.wraps`` exposes the new signature, so
    the signature tells the releases apart; tests/test_drift.py checks that it still does."""
    return {cache_argument(model): cache}


def eager_mask_is_capturable() -> bool:
    """Whether transformers' eager-attention mask can be built inside a CUDA graph capture.

    Up to 5.20, ``masking_utils.eager_mask`` makes its zero with ``torch.tensor(0.0, device=...)``: a
    copy from pageable host memory, which a capture refuses ("Cannot copy between CPU and CUDA tensors
    during CUDA graph capture"); 5.21 makes it on the device (``torch.zeros``). Models that attend
    eagerly (gpt-oss, whose attention sinks other kernels lack) then decode without a graph.
    """
    import inspect

    from transformers import masking_utils

    source = inspect.getsource(masking_utils.eager_mask)
    return "torch.tensor(" not in source
