"""What a checkpoint's budgets mean, computed without loading a single weight.

The model is built on the ``meta`` device from its config, so ``swapmoe info`` answers in a second
even for a model far larger than memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from swapmoe.adapters import adapt
from swapmoe.budget import allocate_slots, minimum_bytes
from swapmoe.checkpoint import CheckpointFiles, check_checkpoint
from swapmoe.errors import SwapMoEError, UnsupportedModelError
from swapmoe.families import (
    FAMILY_RULES,
    auto_model_class,
    require_moe_layers,
    rule_family,
    supported_families,
)


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    model_type: str
    dtype: str
    num_layers: int
    moe_layers: list[str]
    num_experts: list[int]
    top_k: list[int]
    expert_bytes: list[int]
    other_bytes: int
    routing: str
    # bytes of one expert per MoE layer held in each --expert-dtype (weights, scales, zero points);
    # a format the model's shapes cannot take (int4 of an odd dim) is absent
    expert_bytes_as: dict[str, list[int]] = field(default_factory=dict)
    # "mxfp4" where the checkpoint stores its experts so (gpt-oss as published): without --expert-dtype the
    # load holds them so, and expert_bytes_as["mxfp4"] has their bytes (swapmoe.mxfp4)
    published: str | None = None

    @property
    def total_expert_bytes(self) -> int:
        return sum(e * b for e, b in zip(self.num_experts, self.expert_bytes, strict=True))

    @property
    def minimum_budget(self) -> int:
        return minimum_bytes(self.expert_bytes, self.top_k)

    def stored_bytes(self, fmt: str | None = None) -> list[int]:
        """Bytes of one expert per MoE layer in ``fmt`` (None: the model's dtype)."""
        return self.expert_bytes if fmt is None else self.expert_bytes_as[fmt]

    def total_bytes(self, fmt: str | None = None) -> int:
        """Bytes of every expert in ``fmt``."""
        return sum(e * b for e, b in zip(self.num_experts, self.stored_bytes(fmt), strict=True))

    def minimum_budget_as(self, fmt: str | None = None) -> int:
        return minimum_bytes(self.stored_bytes(fmt), self.top_k)

    def slots_for(self, fraction: float, fmt: str | None = None) -> list[int]:
        """Slots per MoE layer for a share of all experts' bytes (as the model holds them), with experts
        held in ``fmt``; never below top-k."""
        allowed = int(fraction * self.total_expert_bytes + 1e-6)
        b = self.stored_bytes(fmt)
        return allocate_slots(max(allowed, minimum_bytes(b, self.top_k)), b, self.num_experts, self.top_k)


def _num_layers(config, default: int) -> int:
    """Transformer layers of the model swapmoe loads: the text model of a multimodal config (Llama 4),
    encoder plus decoder layers of an encoder-decoder (Switch)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = int(getattr(text, "num_hidden_layers", default))
    if getattr(config, "is_encoder_decoder", False):
        n += int(getattr(config, "num_decoder_layers", 0) or 0)
    return n


def meta_model(ckpt: CheckpointFiles, trust_remote_code: bool = False, dtype: torch.dtype | None = None
               ) -> torch.nn.Module:
    """The model of a checked checkpoint built on the meta device (no weight read, no memory), with
    its family's adapter applied: its MoE layers, names and byte sizes are the loaded model's.

    ``dtype`` defaults to the one ``swapmoe.load(dtype="auto")`` loads in (:meth:`CheckpointFiles.auto_dtype`).
    """
    from transformers import AutoConfig

    path = ckpt.path
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise UnsupportedModelError(
            f"transformers cannot read the config in {path} ({str(e).splitlines()[0]}); "
            f"swapmoe supports MoE families: {', '.join(supported_families())}"
        ) from None
    if dtype is None:
        dtype = ckpt.auto_dtype()
    with torch.device("meta"):
        try:
            model = auto_model_class(config).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except ValueError:
            raise UnsupportedModelError(
                f"model type {config.model_type!r} is not a causal or seq2seq LM swapmoe can load; "
                f"supported MoE families: {', '.join(supported_families())}"
            ) from None
    adapt(model)
    return model


def _bytes_as(layers: list, fmt: str) -> list[int] | None:
    """Bytes of one expert per layer in ``fmt``, or None where the shapes cannot be held in it."""
    from swapmoe.loader import stored_expert_bytes

    try:
        return [stored_expert_bytes(la, fmt) for la in layers]
    except SwapMoEError:
        return None


def describe(path: str | Path, trust_remote_code: bool = False, allow_pickle: bool = False,
             dtype: torch.dtype | None = None) -> ModelInfo:
    """What a checkpoint's budgets mean, from its config (``dtype``: as loaded in that dtype)."""
    from swapmoe.loader import stored_expert_bytes
    from swapmoe.mxfp4 import FORMAT as MXFP4
    from swapmoe.mxfp4 import checkpoint_is_mxfp4
    from swapmoe.quant import FORMATS

    ckpt = check_checkpoint(path, allow_pickle=allow_pickle)
    model = meta_model(ckpt, trust_remote_code, dtype)
    config = model.config
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    layers = require_moe_layers(model)
    expert_ids = {id(getattr(la.experts, n)) for la in layers for n in la.expert_param_names}
    seen: set[int] = set()
    other = 0
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) in expert_ids or id(p) in seen:
            continue
        seen.add(id(p))
        other += p.numel() * p.element_size()
    published = None
    bytes_as = {f: b for f in FORMATS if (b := _bytes_as(layers, f)) is not None}
    if checkpoint_is_mxfp4(ckpt.config):
        published = MXFP4
        bytes_as[MXFP4] = [stored_expert_bytes(la, MXFP4) for la in layers]
    family = rule_family(config.model_type, layers[0].router)  # a borrowed router routes as its family
    rule = FAMILY_RULES[family] if family is not None else None
    return ModelInfo(
        path=ckpt.path,
        model_type=config.model_type,
        dtype=str(dtype).replace("torch.", ""),
        num_layers=_num_layers(config, len(layers)),
        moe_layers=[la.name for la in layers],
        num_experts=[la.num_experts for la in layers],
        top_k=[la.top_k for la in layers],
        expert_bytes=[la.expert_bytes() for la in layers],
        other_bytes=other,
        expert_bytes_as=bytes_as,
        published=published,
        routing=(f"{rule} (tested family)" if family == config.model_type else f"{rule} (the rule of {family}, "
                 "whose router it runs)") if rule else "generic substitution (untested family)",
    )
