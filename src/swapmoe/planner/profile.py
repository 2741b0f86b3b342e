"""Profiling a model on this machine: what ``swapmoe plan`` needs to know, in ``profile.json``.

Measured (see docs/planner.md):

* **memory**, by arithmetic from the loaded tensors: bytes per expert and per layer;
* **timing** per MoE layer at batch 1: one expert's compute (1 token), the MoE block at decode
  (1 token) and prefill (a window, per token), one expert's host-to-device copy (pinned on CUDA;
  a memcpy on CPU), the policy step of an update and a whole one-swap update (synchronous, and on
  CUDA the host time of an asynchronous submit, which is what the compute path pays);
* **runs**: the calibration text read as one stream in windows (batch 1, in order, as
  :mod:`swapmoe.evaluation.perplexity`), for a set of configurations: KL(full || config) per
  token, the NLL (log-perplexity), top-1 agreement, hit rate, swaps; and for some, teacher-forced
  decode steps with a KV cache (seconds per token, swaps per token). The configurations are the
  full model; each layer alone at a grid of slot counts (others full); uniform allocations at a
  few budgets (these two for each strategy); the middle uniform one at every update interval and
  without updates; each layer alone in each other format of :data:`swapmoe.quant.FORMATS`, all its
  experts resident, the others full in the base format (``precision`` runs: ``L x formats`` of
  them, see :mod:`swapmoe.planner.perfmodel` for why not the (slots, format) grid); and a few
  random *held-out* configurations (with a random format per layer where formats are profiled)
  that the model is never fitted on, for the prediction-error table.

The file is rewritten after every measurement; a rerun skips what is done (resumable). A profile
made for another model, text or setting is refused rather than mixed in.

    N = calibration tokens, W = window, V = vocabulary, L = MoE layers, E = experts, k = top-k
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import platform
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from swapmoe.budget import allocate_slots
from swapmoe.errors import SwapMoEError
from swapmoe.planner.measure import (
    decode_steps,
    reference_logprobs,
    score,
    time_formats,
    time_layers,
    time_updates,
)
from swapmoe.planner.perfmodel import Config
from swapmoe.provenance import provenance
from swapmoe.quant import FORMATS, parse_expert_dtype

PROFILE_VERSION = 1
REF_CACHE_LIMIT = 2 * 2**30  # bytes of cached full-model log-probabilities (N x V float32)


@dataclass(frozen=True)
class ProfileSettings:
    max_tokens: int = 2048  # calibration tokens used (the first ones of the file)
    window: int = 256
    decode_tokens: int = 64  # teacher-forced decode steps timed per run that times decoding
    layer_points: int = 6  # slot counts per layer in the per-layer accuracy profile
    uniform_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)  # plus the minimum (top-k per layer)
    intervals: tuple[int, ...] = (1, 4, 16, 64, 256)
    reference_interval: int = 16  # per-layer and uniform runs use it (swaps_per_update = 1)
    strategies: tuple[str, ...] = ("exchange", "skip")  # per-layer and uniform runs for each
    holdout: int = 4  # random configurations measured only to report prediction errors
    timing_repeats: int = 20
    seed: int = 0
    decay: float = 0.98
    #: formats each layer is profiled in besides the base (those the model can hold; () for none)
    formats: tuple[str, ...] = FORMATS


def layer_grid(top_k: int, num_experts: int, points: int) -> list[int]:
    """Slot counts below ``E`` to profile a layer at: geometric from ``k`` (dense where it matters)."""
    if num_experts <= top_k:
        return []
    pts = {top_k}
    for i in range(1, max(points, 1)):
        pts.add(int(round(top_k * (num_experts / top_k) ** (i / points))))
    return sorted(p for p in pts if top_k <= p < num_experts)


@dataclass(frozen=True)
class RunSpec:
    role: str  # full, layer, uniform, static, interval, holdout
    config: Config
    decode: bool  # also time decode steps

    @property
    def key(self) -> str:
        return f"{self.role}:{self.config.key()}"


def plan_runs(model: dict[str, Any], settings: ProfileSettings) -> tuple[list[RunSpec], dict[str, Any]]:
    """The configurations a profile measures, in order, and the grid they come from (pure)."""
    num, top_k, bytes_ = model["num_experts"], model["top_k"], model["expert_bytes"]
    total = model["total_expert_bytes"]
    ref_i = settings.reference_interval
    full = Config(tuple(num), ref_i, 1, "exchange")
    runs = [RunSpec("full", full, True)]
    formats = profiled_formats(model, settings)
    if "exchange" not in settings.strategies:
        raise ValueError("the exchange strategy must be profiled (the interval runs use it)")
    strategies = [s for s in ("exchange", "skip") if s in settings.strategies]
    grids = [layer_grid(k, e, settings.layer_points) for k, e in zip(top_k, num, strict=True)]
    for st in strategies:
        for i, grid in enumerate(grids):
            for s in grid:
                slots = list(num)
                slots[i] = s
                runs.append(RunSpec("layer", Config(tuple(slots), ref_i, 1, st), st == "exchange"))
    levels: list[tuple[int, ...]] = [tuple(top_k)]
    for f in sorted(settings.uniform_fractions):
        slots = tuple(allocate_slots(max(int(f * total), model["minimum_bytes"]), bytes_, num, top_k))
        if slots not in levels and list(slots) != list(num):
            levels.append(slots)
    mid_f = sorted(settings.uniform_fractions)[len(settings.uniform_fractions) // 2] if settings.uniform_fractions else 0
    mid = tuple(allocate_slots(max(int(mid_f * total), model["minimum_bytes"]), bytes_, num, top_k))
    for st in strategies:
        for slots in levels:
            runs.append(RunSpec("uniform", Config(slots, ref_i, 1, st), st == "exchange"))
    if list(mid) != list(num):
        runs.append(RunSpec("static", Config(mid, ref_i, 0, "exchange"), True))
        for iv in settings.intervals:
            if iv != ref_i:
                runs.append(RunSpec("interval", Config(mid, iv, 1, "exchange"), True))
    for f in formats:  # at full slots the strategy does not matter: nothing is masked
        for i in range(len(num)):
            fmts = tuple(f if j == i else None for j in range(len(num)))
            runs.append(RunSpec("precision", Config(tuple(num), ref_i, 1, "exchange", fmts), True))
    rng = random.Random(settings.seed)
    # formats of held-out runs come from their own generator: the slots and schedules stay those
    # drawn before formats were profiled
    rng_f = random.Random(settings.seed + 1)
    candidates = sorted(set(settings.intervals) | {8, 32})
    for _ in range(settings.holdout):
        budget = rng.uniform(model["minimum_bytes"], total)
        slots = list(top_k)
        used = model["minimum_bytes"]
        order = list(range(len(num)))
        while True:
            grow = [i for i in order if slots[i] < num[i] and used + bytes_[i] <= budget]
            if not grow:
                break
            i = rng.choice(grow)
            slots[i] += 1
            used += bytes_[i]
        cfg = Config(tuple(slots), rng.choice(candidates), rng.choice((1, 1, 2)),
                     "skip" if rng.random() < 0.3 and "skip" in strategies else "exchange")
        if formats:
            cfg = replace(cfg, expert_dtype=tuple(rng_f.choice([None, *formats]) for _ in num))
        runs.append(RunSpec("holdout", cfg, True))
    grid = {"layer_slots": grids, "uniform_slots": [list(s) for s in levels], "interval_slots": list(mid),
            "intervals": list(settings.intervals), "reference_interval": ref_i, "formats": formats}
    seen: set[str] = set()
    unique = []
    for r in runs:
        if r.key not in seen:
            seen.add(r.key)
            unique.append(r)
    return unique, grid


def profiled_formats(model: dict[str, Any], settings: ProfileSettings) -> list[str]:
    """The formats besides the base that a profile measures: asked for, and holdable by the model
    (``model["format_expert_bytes"]``: absent in profiles made before formats were profiled)."""
    known = model.get("format_expert_bytes", {})
    return [f for f in FORMATS if f in settings.formats and f in known]


def format_expert_bytes(path: Path, dtype_name: str, base: str | None, **kw: Any) -> dict[str, list[int]]:
    """Bytes of one expert per MoE layer in each format other than ``base`` (the profile's format,
    parsed) that the model can be held in, by arithmetic from its config (scales included)."""
    from swapmoe.inspect import describe

    dt = getattr(torch, dtype_name)
    info = describe(path, trust_remote_code=kw.get("trust_remote_code", False),
                    allow_pickle=kw.get("allow_pickle", False), dtype=dt)
    return {f: list(info.expert_bytes_as[f]) for f in FORMATS
            if f in info.expert_bytes_as and parse_expert_dtype(f, dt) != base}


# ----------------------------------------------------------------------------------- the profile
def model_fingerprint(path: Path, sample: int = 1 << 20) -> str:
    """config.json, and per weight file its name, size and first and last MiB: changes when the
    checkpoint is retrained (same shapes, other weights), without reading a large model whole."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(sample))
            fh.seek(max(0, size - sample))
            h.update(fh.read(sample))
    return h.hexdigest()[:16]


def save_profile(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_profile(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SwapMoEError(f"profile {p} does not exist: create it with `swapmoe profile MODEL --calibration FILE "
                           f"--out {p}`")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SwapMoEError(f"profile {p} is not valid JSON ({e}): delete it and run `swapmoe profile` again") from None
    if not isinstance(data, dict) or data.get("version") != PROFILE_VERSION or "runs" not in data:
        raise SwapMoEError(f"{p} is not a swapmoe profile (version {PROFILE_VERSION}): run `swapmoe profile` again")
    return data


def _open(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    if not path.is_file():
        return {"version": PROFILE_VERSION, "meta": meta, "runs": {}}
    data = read_profile(path)
    old = data.get("meta", {})
    keys = ("model_fingerprint", "stream", "tokens", "window", "decode_tokens", "device", "dtype", "expert_dtype")
    differs = [k for k in keys if old.get(k) != meta.get(k)]

    def fixed(settings: dict[str, Any] | None) -> dict[str, Any]:
        # more held-out runs and more formats may be added later (profiles made before formats resume)
        return {k: v for k, v in (settings or {}).items() if k not in ("holdout", "formats")}

    if fixed(old.get("settings")) != fixed(meta.get("settings")):
        differs.append("settings")
    if differs:
        raise SwapMoEError(f"{path} holds a profile of another set-up (differs in {', '.join(differs)}): choose "
                           "another --out, or delete the file to start again")
    return data


@dataclass
class Step:
    key: str
    done: bool


def profile(
    model_path: str | Path,
    token_ids: Sequence[int],
    out: str | Path,
    settings: ProfileSettings | None = None,
    device: str | None = None,
    dtype: str | None = None,
    calibration: str = "",
    on_plan: Callable[[int], None] | None = None,
    on_step: Callable[[Step], None] | None = None,
    **load_kw: Any,
) -> dict[str, Any]:
    """Measure everything ``swapmoe plan`` needs; write ``out`` after every step; return the profile.

    ``on_plan(n)`` is told the number of steps once they are known; ``on_step`` after each step
    (``done`` when it was already in the file). ``load_kw`` goes to :func:`swapmoe.load`.
    """
    import swapmoe
    from swapmoe.evaluation.compare import weight_bytes
    from swapmoe.evaluation.sweep import stream_fingerprint
    from swapmoe.loader import default_model_path, resolve_device

    settings = settings or ProfileSettings()
    path = Path(model_path if model_path is not None else default_model_path()).expanduser().resolve()
    ids = torch.as_tensor(list(token_ids)[: settings.max_tokens], dtype=torch.long)
    if ids.numel() < 2:
        raise SwapMoEError("the calibration text has fewer than 2 tokens: nothing to profile on")
    dev = resolve_device(device)
    meta = {
        "model": str(path), "model_fingerprint": model_fingerprint(path), "calibration": calibration,
        "stream": stream_fingerprint(ids.tolist()), "tokens": int(ids.numel()), "window": settings.window,
        "decode_tokens": settings.decode_tokens, "device": dev.type, "dtype": dtype or "auto",
        "expert_dtype": load_kw.get("expert_dtype"),
        "settings": json.loads(json.dumps(asdict(settings))),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
        "provenance": provenance(dev),  # of the latest run that wrote to the file (a profile may be resumed)
    }
    out = Path(out)
    data = _open(out, meta)
    data["meta"] = meta
    kw = {"device": dev, "dtype": dtype, "decay": settings.decay, **load_kw}
    ref: list[torch.Tensor] = []

    def load(cfg: Config) -> Any:
        k = dict(kw)
        if cfg.mixed():  # None: the base format, as the profile holds every other layer
            k["expert_dtype"] = [f if f is not None else load_kw.get("expert_dtype") for f in cfg.formats()]
        return swapmoe.load(path, slots=list(cfg.slots), update_interval=cfg.update_interval,
                            swaps_per_update=cfg.swaps_per_update, strategy=cfg.strategy, **k)

    # 1. the full model: structure, reference log-probabilities, timing
    full_model = None
    if "model" not in data:
        full_model = swapmoe.load(path, "100%", **kw)
        layers = [st.layer for st in full_model.swapmoe.layers]
        # bytes of one expert as held (in --expert-dtype where given: weights, scales and zero points)
        eb = [st.full_bytes // st.layer.num_experts for st in full_model.swapmoe.layers]
        data["model"] = {
            "model_type": full_model.config.model_type, "num_layers": len(layers),
            "num_experts": [la.num_experts for la in layers], "top_k": [la.top_k for la in layers],
            "expert_bytes": eb, "layer_bytes": [b * la.num_experts for b, la in zip(eb, layers, strict=True)],
            "total_expert_bytes": sum(b * la.num_experts for b, la in zip(eb, layers, strict=True)),
            "minimum_bytes": sum(b * la.top_k for b, la in zip(eb, layers, strict=True)),
            # what a share ("50%") is of, as swapmoe.load counts it: all experts as the model holds them
            "share_of_bytes": full_model.swapmoe.total_expert_bytes,
            "other_bytes": weight_bytes(full_model)[1],
            "dtype": str(next(p.dtype for p in full_model.parameters() if p.is_floating_point())).replace("torch.", ""),
        }
        save_profile(out, data)
    if "format_expert_bytes" not in data["model"]:  # also for a profile made before formats were profiled
        base = parse_expert_dtype(load_kw.get("expert_dtype"), getattr(torch, data["model"]["dtype"]))
        data["model"]["format_expert_bytes"] = format_expert_bytes(path, data["model"]["dtype"], base, **load_kw)
        save_profile(out, data)
    runs, grid = plan_runs(data["model"], settings)
    data["grid"] = grid
    todo = [r for r in runs if r.key not in data["runs"]]
    if on_plan is not None:
        on_plan(len(runs) + 2)
    if on_step is not None:
        on_step(Step("model", True))
    if todo or "timing" not in data:
        if full_model is None:
            full_model = swapmoe.load(path, "100%", **kw)
        if todo:
            vocab = full_model.config.vocab_size
            if ids.numel() * vocab * 4 > REF_CACHE_LIMIT:
                raise SwapMoEError(f"{ids.numel()} calibration tokens x vocabulary {vocab} is too much to cache: "
                                   "use --max-tokens to profile on fewer tokens")
            ref, _ = reference_logprobs(full_model, ids, settings.window)
    if "timing" not in data:
        assert full_model is not None
        timing = time_layers(full_model, settings.window, settings.timing_repeats)
        minimal = load(Config(tuple(data["model"]["top_k"]), settings.reference_interval, 1, "exchange"))
        timing.update(time_updates(minimal, settings.timing_repeats))
        del minimal
        data["timing"] = timing
        save_profile(out, data)
    formats = profiled_formats(data["model"], settings)
    missing = [f for f in formats if f not in data["timing"].get("format_decode_delta_s", {})]
    if missing:
        if full_model is None:
            full_model = swapmoe.load(path, "100%", **kw)
        others = {f: swapmoe.load(path, "100%", **{**kw, "expert_dtype": f}) for f in missing}
        data["timing"].setdefault("format_decode_delta_s", {}).update(
            time_formats(full_model, others, settings.timing_repeats))
        del others
        save_profile(out, data)
    if on_step is not None:
        on_step(Step("timing", False))
    for spec in runs:
        if spec.key in data["runs"]:
            if on_step is not None:
                on_step(Step(spec.key, True))
            continue
        model = full_model if spec.role == "full" and full_model is not None else load(spec.config)
        row: dict[str, Any] = {"role": spec.role, "slots": list(spec.config.slots),
                               "update_interval": spec.config.update_interval,
                               "swaps_per_update": spec.config.swaps_per_update, "strategy": spec.config.strategy}
        if spec.config.mixed():
            row["expert_dtype"] = list(spec.config.formats())  # null: the base format
        if spec.role == "full":
            model.swapmoe.reset_stats()
        # the full row is measured like every other: its KL against the reference (the same model's
        # earlier forward) is 0 only if that forward is reproduced bit for bit, a figure to check
        row.update(score(model, ids, settings.window, ref))
        row["expert_bytes"] = model.swapmoe.stats()["total"]["resident_bytes"]
        if spec.decode:
            row.update(decode_steps(model, ids, settings.decode_tokens))
        data["runs"][spec.key] = row
        save_profile(out, data)
        if model is not full_model:
            del model
            gc.collect()
        if on_step is not None:
            on_step(Step(spec.key, False))
    data["runs"] = {k: data["runs"][k] for k in [r.key for r in runs] if k in data["runs"]} | {
        k: v for k, v in data["runs"].items() if k not in {r.key for r in runs}}
    save_profile(out, data)
    return data


def fitted_runs(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in data["runs"].values() if r.get("role") != "holdout"]


def holdout_runs(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in data["runs"].values() if r.get("role") == "holdout"]


def summary(data: dict[str, Any]) -> dict[str, Any]:
    """A few headline figures of a profile (for the command's output)."""
    t, m = data["timing"], data["model"]
    full = next(r for r in data["runs"].values() if r["role"] == "full")
    return {
        "expert_bytes": m["expert_bytes"][0], "layer_bytes": m["layer_bytes"][0],
        "expert_compute_ms": 1e3 * statistics.median(t["expert_compute_s"]),
        "layer_decode_ms": 1e3 * statistics.median(t["layer_decode_s"]),
        "layer_prefill_ms_per_token": 1e3 * statistics.median(t["layer_prefill_s_per_token"]),
        "transfer_ms": 1e3 * statistics.median(t["transfer_s"]),
        "transfer_gb_per_s": statistics.median(t["transfer_bytes_per_s"]) / 1e9,
        "update_ms": 1e3 * statistics.median(t["update_s"]),
        "update_submit_ms": 1e3 * statistics.median(t["update_submit_s"]),
        "full_decode_ms": 1e3 * full["decode_s_per_token"], "full_perplexity": math.exp(full["nll"]),
    }
