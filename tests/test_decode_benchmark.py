"""benchmarks/decode.py, the GPU decode benchmark, run end to end on a CPU at toy size.

The GPU session's 30 minutes go into its runs; a setting that fails to load, a row that loses its
figures or a typo that times nothing should be found here, in CI, before a device call is spent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.repo_scripts import REPO, load_script

SETTINGS = ["plain transformers, eager", "swapmoe 50%, graph", "swapmoe int8, slots of 50%, graph",
            "swapmoe int4, slots of 50%, graph", "quantized-all 50%, graph",
            "swapmoe mixed int8/int4 (planned 50%), graph", "ondemand 50%"]


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": f"{REPO / 'src'}:{REPO}", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "decode.py"), "--arch", "tiny", "--device", "cpu",
                           "--model-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_every_setting_times_and_reports_on_a_cpu(tmp_path):
    done = _run(tmp_path, "--tokens", "2", "--rounds", "2", "--profile-tokens", "2", "--settings", ";".join(SETTINGS))
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "decode-tiny.json").read_text())
    assert data["complete"] and data["rounds_done"] == 2
    assert {"torch", "transformers", "device", "git_commit", "created_utc"} <= set(data)
    rows = {r["setting"]: r for r in data["rows"]}
    assert list(rows) == SETTINGS  # every requested setting, in the order the table lists them
    for r in rows.values():
        assert len(r["ms"]) == 2 and all(ms > 0 for ms in r["ms"]) and r["ms_min"] <= r["ms_median"], r
    bf16, int8, int4 = (rows[f"swapmoe {f}"]["expert_bytes"] for f in
                        ("50%, graph", "int8, slots of 50%, graph", "int4, slots of 50%, graph"))
    assert int4 < int8 < bf16  # the same slots in fewer bytes: weights plus scales (and zero points)
    assert 0.45 < int8 / bf16 < 0.6 and 0.2 < int4 / bf16 < 0.35, (bf16, int8, int4)
    for name in ("quantized-all 50%, graph", "swapmoe mixed int8/int4 (planned 50%), graph"):
        assert rows[name]["hit_rate"] == 1.0 and rows[name]["swaps"] == 0  # every expert resident
    assert rows["swapmoe 50%, graph"]["hit_rate"] < 1.0  # half the experts: some lookups miss
    assert rows["ondemand 50%"]["swaps"] > 0


def test_an_unknown_setting_is_refused_before_anything_is_built(tmp_path):
    done = _run(tmp_path, "--settings", "swapmoe 50%, graph;swapmoe 50%, grph")
    assert done.returncode == 2 and "unknown setting(s) ['swapmoe 50%, grph']" in done.stderr
    assert not (tmp_path / "ckpt").exists()
    compiled = _run(tmp_path, "--settings", "swapmoe 50%, graph+compiled")
    assert compiled.returncode == 2 and "need --compile-step" in compiled.stderr


@pytest.mark.parametrize(("layers", "expected"), [
    (8, ["int8", "int8", "int4", "int8", "int8", "int8", "int8", "int8"]),
    (16, ["int8"] * 4 + ["int4"] * 2 + ["int8"] * 10),
    (4, ["int8", "int4", "int8", "int8"]),
])
def test_a_plans_formats_spread_over_a_deeper_or_shallower_model(layers, expected):
    decode = load_script("benchmarks/decode.py")
    assert decode.spread(decode.MIXED_50, layers) == expected
