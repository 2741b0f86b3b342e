"""swapmoe: serve off-the-shelf Mixture-of-Experts LLMs within a device-memory budget.

Implements SwapMoE (Kong et al., ACL 2024): Virtual Experts (a small, changing resident set per
layer), Masked Gating (tokens routed only to resident experts) and amortised asynchronous updates.

    model = swapmoe.load("./checkpoint", memory_budget="40%")   # a transformers model
    model.generate(...)
    model.swapmoe.stats()
"""

import transformers as _transformers

from swapmoe.compat import warn_if_untested_transformers
from swapmoe.errors import SwapMoEError
from swapmoe.loader import load

warn_if_untested_transformers(_transformers.__version__)

__all__ = ["SwapMoEError", "load"]
__version__ = "0.1.0"
