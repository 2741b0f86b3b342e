"""Tiny gpt-oss checkpoints in the layout the published gpt-oss checkpoints use: MXFP4 experts.

``make_mxfp4_checkpoint(dir)`` builds the seeded tiny gpt-oss of :mod:`tests.tiny_models` (with an
expert intermediate size of 32: MXFP4 blocks are 32 values along each input dim), encodes its expert
matrices with :func:`swapmoe.mxfp4.encode` and saves, as openai/gpt-oss-20b does:

* ``...mlp.experts.gate_up_proj_blocks [E, 2I, H/32, 16]`` / ``_scales [E, 2I, H/32]`` (uint8) and
  ``down_proj_blocks [E, H, I/32, 16]`` / ``_scales [E, H, I/32]``: the transpose of the module's
  ``[E, H, 2I]`` / ``[E, I, H]``;
* every other tensor (biases, attention, router, embeddings) in bfloat16;
* ``quantization_config: {"quant_method": "mxfp4", "modules_to_not_convert": [...]}`` in config.json.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from swapmoe import mxfp4
from tests.tiny_models import build_model

# what openai/gpt-oss-20b's config.json lists (its router, attention, embeddings and head are bf16)
QUANTIZATION_CONFIG = {
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
    "quant_method": "mxfp4",
}


def make_mxfp4_checkpoint(path: str | Path, seed: int = 0,
                          edit_parts: Callable[[dict[str, torch.Tensor]], None] | None = None,
                          **overrides: Any) -> Path:
    """Write a tiny MXFP4 gpt-oss checkpoint to ``path``; ``edit_parts`` may change the state dict
    (checkpoint names -> tensors) before it is saved (to corrupt it on purpose)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = build_model("gpt_oss", seed=seed, **{"intermediate_size": 32, **overrides})
    state: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        proj = name.rsplit(".", 1)[-1]
        if ".experts." in name and proj in mxfp4.QUANTISED:
            blocks, scales = mxfp4.encode(t.detach().transpose(-1, -2))  # [E, out, in] as published
            state[f"{name}_blocks"], state[f"{name}_scales"] = blocks.contiguous(), scales.contiguous()
        else:
            state[name] = t.detach().to(torch.bfloat16).contiguous()
    if edit_parts is not None:
        edit_parts(state)
    model.config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = QUANTIZATION_CONFIG
    cfg["dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
