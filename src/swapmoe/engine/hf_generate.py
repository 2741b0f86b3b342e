"""``model.generate`` through the decoder: a transformers user keeps their code and gets the graph.

:func:`install` wraps two methods of *one model instance* (nothing process-wide): ``generate`` hands
transformers a static cache owned by the model's :class:`~swapmoe.engine.decoder.Decoder`, sized for
the call, and ``forward`` sends transformers' single-token decode steps on that cache to
:meth:`Decoder.step` (one CUDA graph replay), every other forward to the model's own forward.
Only calls the graph reproduces exactly take this path: batch 1, a decoder-only model, greedy or
sampled search without beams or assistants, no padding; anything else runs as plain transformers.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import torch

from swapmoe.engine.decoder import Decoder, decoder_for, plain_no_grad


def _cache_of(kwargs: dict[str, Any]) -> Any:
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _generation_config(model: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    """The generation config a call uses: given by keyword, as generate's second positional argument,
    or the model's."""
    from transformers import GenerationConfig

    given = kwargs.get("generation_config")
    if given is None and args and isinstance(args[0], GenerationConfig):
        given = args[0]
    return given or model.generation_config


def _eligible(model: Any, dec: Decoder, inputs: Any, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Can this generate call decode through ``dec``? (At most one host read: the attention mask.)"""
    if dec.mode == "dynamic" or getattr(model.config, "is_encoder_decoder", False):
        return False
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2 or inputs.shape[0] != 1:
        return False
    if _cache_of(kwargs) is not None or kwargs.get("assistant_model") is not None:
        return False
    config = _generation_config(model, args, kwargs)
    wanted = {k: kwargs.get(k, getattr(config, k, None)) for k in ("use_cache", "output_attentions",
                                                                    "output_hidden_states")}
    if wanted["use_cache"] is False or wanted["output_attentions"] or wanted["output_hidden_states"]:
        return False  # the replay returns logits only, and needs the cache
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1))
    if (beams or 1) != 1 or kwargs.get("prompt_lookup_num_tokens") or kwargs.get("inputs_embeds") is not None:
        return False
    mask = kwargs.get("attention_mask")
    return mask is None or bool(mask.all())  # padding shifts positions the graph derives from the cache


def _room(model: Any, prompt_len: int, args: tuple, kwargs: dict[str, Any]) -> int:
    """Tokens the call may hold: prompt + max_new_tokens (or max_length), as generate will decide."""
    config = _generation_config(model, args, kwargs)
    new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if new is not None:
        return prompt_len + int(new)
    length = kwargs.get("max_length", getattr(config, "max_length", None)) or prompt_len + 20
    return max(int(length), prompt_len + 1)


def install(model: Any, mode: str | None = None) -> Decoder:
    """Route ``model.generate`` through the model's decoder (see the module docstring)."""
    dec = decoder_for(model, mode)
    if "_swapmoe_generate" in model.__dict__:
        return dec
    plain_generate = model.generate
    plain_forward = model.forward
    output_type: dict[str, Any] = {}

    def generate(self: Any, inputs: Any = None, *args: Any, **kwargs: Any) -> Any:
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if not _eligible(self, dec, ids, args, kwargs):
            return plain_generate(inputs, *args, **kwargs)
        dec.start(_room(self, ids.shape[1], args, kwargs))
        kwargs[dec.cache_kw] = dec.cache
        # transformers compiles the forward when it is handed a static cache; the decoder captures the
        # step itself, and a compile inside a capture fails
        kwargs["disable_compile"] = True
        dec.hf_active = True
        try:
            return plain_generate(inputs, *args, **kwargs)
        finally:
            dec.hf_active = False

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not dec.hf_active or _cache_of(kwargs) is not dec.cache or ids is None:
            return plain_forward(*args, **kwargs)
        if ids.shape[-1] != 1 or not dec.history or not output_type:
            # the prompt (or anything but a single-token step): the model's own forward, on our cache
            with plain_no_grad():
                out = plain_forward(*args, **kwargs)
            dec.history.extend(ids[0])
            output_type["cls"] = type(out)
            output_type["cache"] = next(f.name for f in dataclasses.fields(out)
                                        if f.name in ("cache", "past_key_values"))
            return out
        logits = dec.step(ids[0, -1]).view(1, 1, -1).clone()  # [1, 1, V]: the graph's buffer is reused
        return output_type["cls"](logits=logits, **{output_type["cache"]: dec.cache})

    model.__dict__["_swapmoe_generate"] = True
    model.__dict__["_swapmoe_plain_forward"] = plain_forward
    model.generate = types.MethodType(generate, model)
    model.forward = types.MethodType(forward, model)
    return dec
