"""Family adapters: convert MoE blocks that transformers does not keep in the fused layout.

Most families need nothing: their experts are one fused module next to a router (see
:mod:`swapmoe.families`). A family whose experts are separate modules (Switch Transformers) or are
run densely (Llama 4), or that are stored or routed otherwise (DBRX's 2-D expert tensors, JetMoE's
parallel experts, LongCat-Flash's zero-compute experts) gets an *adapter*: a function that replaces each of its MoE blocks, in
place, by an equivalent block with a :class:`~swapmoe.adapters.base.SparseExperts` module and
a router returning ``(logits, weights, indices)``. After :func:`adapt` the model is an ordinary
fused-layout model to the rest of swapmoe. See docs/families.md for what an adapter must provide.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from swapmoe.adapters import dbrx, jetmoe, llama4, longcat, switch

# model_type -> in-place conversion of the model's MoE blocks (returns how many it converted)
ADAPTERS: dict[str, Callable[[nn.Module], int]] = {
    "llama4": llama4.adapt,
    "llama4_text": llama4.adapt,
    "switch_transformers": switch.adapt,
    "dbrx": dbrx.adapt,
    "jetmoe": jetmoe.adapt,
    "longcat_flash": longcat.adapt,
}

# experts modules that must go through an adapter: find_moe_layers never takes them as they are
UNADAPTED_EXPERTS = frozenset(llama4.DENSE_EXPERTS) | {"LongcatFlashExperts"}


def adapt(model: nn.Module) -> int:
    """Convert the MoE blocks of ``model`` for swapmoe if its family needs it; idempotent.

    Returns the number of blocks converted (0 for families that need no adapter, or when done).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    fn = ADAPTERS.get(model_type) if isinstance(model_type, str) else None
    return fn(model) if fn is not None else 0
