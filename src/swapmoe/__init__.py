"""swapmoe: serve off-the-shelf Mixture-of-Experts LLMs within a device-memory budget.

Implements SwapMoE (Kong et al., ACL 2024): Virtual Experts (a small, changing resident set per
layer), Masked Gating (tokens routed only to resident experts) and amortised asynchronous updates.

    model = swapmoe.load("./checkpoint", memory_budget="40%")   # a transformers model
    model.generate(...)
    model.swapmoe.stats()
"""

from swapmoe.errors import SwapMoEError
from swapmoe.loader import load

__all__ = ["SwapMoEError", "load"]
__version__ = "0.1.0"
