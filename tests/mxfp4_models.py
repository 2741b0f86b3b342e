"""Tiny gpt-oss checkpoints in the layout the published gpt-oss checkpoints use: MXFP4 experts.

``make_mxfp4_checkpoint(dir)`` builds the seeded tiny gpt-oss of :mod:`tests.tiny_models` (with an
expert intermediate size of 32: MXFP4 blocks are 32 values along each input dim) and saves it with
:func:`swapmoe.mxfp4.save_mxfp4`, as openai/gpt-oss-20b is stored:

* ``...mlp.experts.gate_up_proj_blocks [E, 2I, H/32, 16]`` / ``_scales [E, 2I, H/32]`` (uint8) and
  ``down_proj_blocks [E, H, I/32, 16]`` / ``_scales [E, H, I/32]``: the transpose of the module's
  ``[E, H, 2I]`` / ``[E, I, H]``;
* every other tensor (biases, attention, router, embeddings) in bfloat16;
* ``quantization_config: {"quant_method": "mxfp4", "modules_to_not_convert": [...]}`` in config.json.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from swapmoe.mxfp4 import mxfp4_state_dict, save_mxfp4
from tests.tiny_models import build_model


def make_mxfp4_checkpoint(path: str | Path, seed: int = 0,
                          edit_parts: Callable[[dict[str, torch.Tensor]], None] | None = None,
                          **overrides: Any) -> Path:
    """Write a tiny MXFP4 gpt-oss checkpoint to ``path``; ``edit_parts`` may change the state dict
    (checkpoint names -> tensors) before it is saved (to corrupt it on purpose)."""
    model = build_model("gpt_oss", seed=seed, **{"intermediate_size": 32, **overrides})
    state = mxfp4_state_dict(model)
    if edit_parts is not None:
        edit_parts(state)
    return save_mxfp4(model, path, state)
