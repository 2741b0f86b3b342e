"""Checking a checkpoint directory before anything is loaded.

Loading a broken checkpoint half-way wastes minutes and memory and ends in a deep traceback; here
every problem a user can fix is found up front and reported as one line that says what to do.
Only safetensors are accepted unless the user opts in to pickle (``.bin``) files, which can run
arbitrary code when loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from swapmoe.errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


@dataclass(frozen=True)
class CheckpointFiles:
    """What a checked checkpoint directory holds."""

    path: Path
    config: dict
    weight_files: list[Path]
    use_safetensors: bool

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)

    def auto_dtype(self) -> torch.dtype:
        """The dtype ``dtype="auto"`` loads in, as transformers decides it: the config's ``dtype`` (or
        ``torch_dtype``), else the first floating-point tensor's in the safetensors files, else float32."""
        named = self.config.get("dtype") or self.config.get("torch_dtype")
        if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype):
            return getattr(torch, named)
        table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
        for f in self.weight_files if self.use_safetensors else []:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                    found = table.get(st.get_slice(k).get_dtype())
                    if found is not None:
                        return found
        return torch.float32


def _check_safetensors(f: Path) -> list[str]:
    """Open the header (cheap: no tensor data is read) and check the file holds all it announces."""
    try:
        with safe_open(str(f), framework="pt") as st:
            keys = list(st.keys())
    except Exception as e:  # safetensors raises its own error types, and OSError
        raise CheckpointError(
            f"{f} is not a valid safetensors file ({e}); the file is corrupt or truncated: "
            "copy or download it again"
        ) from None
    return keys


def check_checkpoint(path: str | Path, allow_pickle: bool = False, revision: str | None = None) -> CheckpointFiles:
    """Validate a Hugging Face checkpoint directory; raise :class:`CheckpointError` naming the fix.

    ``path`` may also be a Hub repo id (``org/name``, at ``revision``): it is resolved to its snapshot
    in the local Hugging Face cache first (:func:`swapmoe.hub.resolve_model`), then checked alike.
    """
    from swapmoe.hub import resolve_model

    p = resolve_model(path, revision, allow_pickle)
    if not p.exists():
        raise CheckpointError(
            f"model directory {p} does not exist: pass the path of a Hugging Face checkpoint directory "
            "(config.json and *.safetensors), or a Hugging Face repo id (org/name)"
        )
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file, not a model directory: pass the directory that holds config.json")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{p} has no config.json: it is not a Hugging Face model directory")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}): fix or replace the file") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{cfg_path} has no 'model_type': it is not a transformers model config")

    index = p / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e}): fix or replace it") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (p / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{p} is incomplete: shard(s) {', '.join(missing)} listed in {SAFETENSORS_INDEX} are missing; "
                "copy or download the complete checkpoint"
            )
        files = [p / s for s in shards]
        present: set[str] = set()
        for f in files:
            present.update(_check_safetensors(f))
        absent = [k for k in weight_map if k not in present]
        if absent:
            raise CheckpointError(
                f"{p} is inconsistent: {len(absent)} tensor(s) listed in {SAFETENSORS_INDEX} are in no shard "
                f"(e.g. {absent[0]}); copy or download the checkpoint again"
            )
        return CheckpointFiles(p, config, files, True)

    files = sorted(p.glob("*.safetensors"))
    if files:
        for f in files:
            _check_safetensors(f)
        return CheckpointFiles(p, config, files, True)

    pickles = sorted({f for pat in PICKLE_PATTERNS for f in p.glob(pat)})
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{p} holds only pickle weights ({pickles[0].name}), which can run arbitrary code when loaded; "
                "convert them to safetensors, or pass --allow-pickle (allow_pickle=True) if you trust the source"
            )
        return CheckpointFiles(p, config, pickles, False)
    raise CheckpointError(f"{p} has a config.json but no weights (*.safetensors): copy the weight files too")
