"""Loading without holding the experts that stay in the checkpoint files.

transformers' ``from_pretrained`` materialises every tensor of a checkpoint in host memory. With a
host budget, the experts of the layers beyond it are read from the files at swap time anyway, so
holding them during the load is waste, and for a checkpoint larger than host memory it is what
makes the load fail. :class:`ExpertStreamer` intercepts transformers' hand-over of each loaded
parameter to the model (``transformers.core_model_loading.set_param_for_module``, the same in 5.17
and 5.23). When a fused expert parameter of such a layer arrives, it:

1. finds the checkpoint tensors behind it and verifies them against the value just loaded
   (:class:`swapmoe.mmap_store.RecipeFinder`, first and last expert);
2. keeps what the runtime needs from the values: each expert's squared norm (importance uses
   ``||E_i||``, and the initial resident set the largest norms);
3. hands transformers a meta tensor of the same shape instead, so the value is freed as soon as
   transformers lets go of it (one layer's parameter at a time, not the whole checkpoint).

While it streams, transformers reads tensors in order rather than on worker threads ahead of use
(its ``HF_DEACTIVATE_ASYNC_LOAD`` switch), which is what bounds the peak; loading is slower for it.

A parameter whose recipe cannot be verified is kept as loaded, and the loader keeps it in host
memory: a wrong mapping can never produce wrong weights.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from swapmoe.importance import expert_sq_norms
from swapmoe.mmap_store import Recipe, RecipeFinder

log = logging.getLogger(__name__)

# transformers' loader is patched for the duration of one load; two loads in one process take turns
_PATCH_LOCK = threading.Lock()
_ASYNC_SWITCH = "HF_DEACTIVATE_ASYNC_LOAD"  # read by transformers at each load (5.17 and 5.23)


def loading_hook_module() -> Any:
    """transformers' loading module if it has the per-parameter hook the streamer needs, else None."""
    try:
        import transformers.core_model_loading as loading
    except ImportError:
        return None
    return loading if callable(getattr(loading, "set_param_for_module", None)) else None


@dataclass
class StreamedParam:
    """A fused expert parameter that was not kept: where it is in the files and its experts' norms."""

    recipe: Recipe
    norm_sq: torch.Tensor  # [E] float32: squared Frobenius norm of each expert's slice
    shape: torch.Size  # [E, ...]
    dtype: torch.dtype


@dataclass
class ExpertStreamer:
    """Context manager around ``from_pretrained``: streams the expert parameters named in ``targets``.

    targets   full parameter name in the model -> (MoE block name, parameter name in its experts module)
    where     checkpoint tensor name -> file (:func:`swapmoe.mmap_store.weight_files`)
    """

    targets: dict[str, tuple[str, str]]
    where: dict[str, Path]
    streamed: dict[str, dict[str, StreamedParam]] = field(default_factory=dict)  # block -> name -> param
    # an MXFP4 checkpoint's layers stored so: block -> part -> checkpoint key (swapmoe.mxfp4.find_parts)
    mxfp4: dict[str, dict[str, str]] = field(default_factory=dict)
    finders: dict[str, RecipeFinder] = field(default_factory=dict)
    _restore: tuple[Any, Any] | None = None
    _async_env: str | None = None

    def __enter__(self) -> ExpertStreamer:
        loading = loading_hook_module()
        if loading is None:
            log.warning("this transformers release has no per-parameter loading hook: the checkpoint is "
                        "loaded whole once (the host budget applies after loading)")
            return self
        original = loading.set_param_for_module
        _PATCH_LOCK.acquire()
        # transformers reads checkpoint tensors on worker threads ahead of the main thread that hands
        # them over; under a host budget they must not all be in memory at once, so it loads them
        # one by one (its own switch, which it also uses to bound memory while quantising)
        self._async_env = os.environ.get(_ASYNC_SWITCH)
        os.environ[_ASYNC_SWITCH] = "1"

        def set_param_for_module(model: Any, target_name: str, param_value: Any, *args: Any, **kwargs: Any) -> Any:
            return original(model, target_name, self._intercept(target_name, param_value), *args, **kwargs)

        loading.set_param_for_module = set_param_for_module
        self._restore = (loading, original)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._restore is not None:
            loading, original = self._restore
            loading.set_param_for_module = original
            self._restore = None
            if self._async_env is None:
                os.environ.pop(_ASYNC_SWITCH, None)
            else:
                os.environ[_ASYNC_SWITCH] = self._async_env
            _PATCH_LOCK.release()

    def _intercept(self, target_name: str, value: Any) -> Any:
        target = self.targets.get(target_name)
        if target is None or not isinstance(value, torch.Tensor) or value.device.type == "meta":
            return value
        block, name = target
        finder = self.finders.setdefault(block, RecipeFinder(block, self.where))
        tensor = value.detach()  # [E, ...]
        recipe = finder.recipe(name, tensor)
        if recipe is None:
            return value  # kept as loaded: the loader holds it in host memory
        norm_sq = expert_sq_norms(tensor)  # [E], a few experts at a time (no float copy of the layer)
        self.streamed.setdefault(block, {})[name] = StreamedParam(recipe, norm_sq, tensor.shape, tensor.dtype)
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")

    @property
    def streamed_bytes(self) -> int:
        """Bytes of expert weights that were never kept in host memory."""
        return sum(p.shape.numel() * torch.empty((), dtype=p.dtype).element_size()
                   for params in self.streamed.values() for p in params.values())
