"""The fused MoE kernels compiled for a Hopper GPU (sm_90) on a machine without one.

Triton's interpreter (tests/test_fused_moe.py) checks what the kernels compute but accepts code that the
compiler rejects; here each variant goes through Triton's whole pipeline to a cubin with the ptxas that
Triton ships, and its machine code is checked for what the kernels are built for: weight loads 16 bytes
wide and no register spills. Launch-time specialisation is given as a launch on a GPU would derive it
(pointers and dims divisible by 16, unit strides as constants).
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

KERNEL_MODULE = "swapmoe.kernels.fused_moe"
DIVISIBLE = {"x_ptr", "ids_ptr", "w_ptr", "sc_ptr", "zp_ptr", "b_ptr", "h_ptr", "tw_ptr", "out_ptr", "H", "N_I", "stride_x",
             "stride_o", "sw_s", "sw_n", "sw_k", "ss_s", "ss_n", "sb_s", "up_row"}


@pytest.fixture(scope="module")
def compiled_module():
    """The kernel module as a GPU run defines it (no interpreter), compiled here without a GPU."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "ptxas").exists() or not (bin_dir / "cuobjdump").exists():
        pytest.skip("this Triton has no bundled ptxas/cuobjdump")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        sys.modules.pop(KERNEL_MODULE, None)
        yield importlib.import_module(KERNEL_MODULE), bin_dir
    sys.modules.pop(KERNEL_MODULE, None)


def _sass(fm, bin_dir: Path, kernel, types: dict[str, str], consts: dict, tmp_path: Path) -> tuple[str, str]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in names
                           if n in DIVISIBLE and n not in consts})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    cubin = tmp_path / f"{kernel.fn.__name__}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    run = lambda *a: subprocess.run([str(bin_dir / "cuobjdump"), *a, str(cubin)], capture_output=True,  # noqa: E731
                                    text=True, check=True, env={**os.environ}).stdout
    return run("-res-usage"), run("-sass")


def _loads(sass: str) -> Counter:
    return Counter(t for line in sass.splitlines() for t in line.replace(";", " ").split() if t.startswith("LDG"))


# the pointers that a variant does not read are the ones the launch passes as dummies (fused_moe._scale_args)
BF16 = {"x_ptr": "*bf16", "ids_ptr": "*i64", "w_ptr": "*bf16", "sc_ptr": "*bf16", "zp_ptr": "*bf16", "b_ptr": "*bf16",
        "h_ptr": "*fp32", "tw_ptr": "*fp32", "out_ptr": "*bf16", "alpha": "fp32", "limit": "fp32"}
INT8 = {**BF16, "w_ptr": "*i8", "sc_ptr": "*fp16", "zp_ptr": "*fp16"}
PACKED = {**BF16, "w_ptr": "*u8", "sc_ptr": "*fp16", "zp_ptr": "*fp16"}  # int4, int3, int2: bytes of codes
# (name, kernel, types, constexprs, least 16-byte loads per loop step): OLMoE/Qwen3 (SiLU, [S, out, in]),
# gpt-oss (clamped SwiGLU, biases, transposed and interleaved), int8, int4, int2 and int3 with whole groups per
# step (the packed formats with their default tiles, fused_moe.default_blocks)
VARIANTS = [
    ("gate_up silu", "_gate_up_kernel", BF16, {"ACT": 0, "HAS_BIAS": False, "QUANT": False, "GROUP": 0,
                                               "INTERLEAVED": False, "BLOCK_N": 16, "BLOCK_K": 256, "sw_k": 1}, 8),
    ("down", "_down_kernel", BF16, {"HAS_BIAS": False, "QUANT": False, "GROUP": 0, "BLOCK_N": 8,
                                    "BLOCK_K": 1024, "sw_k": 1}, 8),
    ("gate_up gpt-oss", "_gate_up_kernel", BF16, {"ACT": 1, "HAS_BIAS": True, "QUANT": False, "GROUP": 0,
                                                  "INTERLEAVED": True, "BLOCK_N": 16, "BLOCK_K": 256, "sw_n": 1}, 8),
    ("down gpt-oss", "_down_kernel", BF16, {"HAS_BIAS": True, "QUANT": False, "GROUP": 0, "BLOCK_N": 16,
                                            "BLOCK_K": 512, "sw_n": 1}, 4),
    ("gate_up int8", "_gate_up_kernel", INT8, {"ACT": 0, "HAS_BIAS": False, "QUANT": 8, "GROUP": 64,
                                               "INTERLEAVED": False, "BLOCK_N": 16, "BLOCK_K": 256, "sw_k": 1,
                                               "ss_g": 1}, 4),
    ("down int8", "_down_kernel", INT8, {"HAS_BIAS": False, "QUANT": 8, "GROUP": 64, "BLOCK_N": 8,
                                         "BLOCK_K": 1024, "sw_k": 1, "ss_g": 1}, 4),
]


def _packed(bits: int, wide_gate_up: int, wide_down: int) -> list[tuple]:
    """The packed format of ``bits`` (int4, int3, int2: uint8 codes, fp16 scales and zero points) with its
    default tiles (fused_moe.default_blocks), gate/up and down, and each one's least 16-byte loads a step."""
    q = {"HAS_BIAS": False, "QUANT": bits, "GROUP": 64, "sw_k": 1, "ss_g": 1}
    return [(f"gate_up int{bits}", "_gate_up_kernel", PACKED,
             {"ACT": 0, **q, "INTERLEAVED": False, "BLOCK_N": 16, "BLOCK_K": 512}, wide_gate_up),
            (f"down int{bits}", "_down_kernel", PACKED, {**q, "BLOCK_N": 8, "BLOCK_K": 1024}, wide_down)]


VARIANTS += _packed(4, 4, 4) + _packed(2, 2, 3) + _packed(3, 0, 0)


@pytest.mark.parametrize(("name", "kernel", "types", "consts", "wide"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_kernel_compiles_for_sm90_with_wide_loads_and_no_spills(compiled_module, tmp_path, name, kernel, types,
                                                                consts, wide):
    fm, bin_dir = compiled_module
    usage, sass = _sass(fm, bin_dir, getattr(fm, kernel), types, consts, tmp_path)
    assert "LOCAL:0" in usage and "STACK:0" in usage, usage  # no spills to local memory
    loads = _loads(sass)
    # measured: 8-10 16-byte loads a step (SiLU, gpt-oss gate_up), 5-6 (gpt-oss down, int8), 4 (int4: half a
    # byte a weight; its down's 4 are 2 of codes and 2 of h), 2 and 3 (int2: a quarter byte a weight, one 16-byte
    # load of codes a thread per projection); the scales of int8 are 4 (gate_up) or 1 (down) 2-byte loads a
    # step, the scales and zero points of int4/int3/int2 4 (gate_up) or 2 (down), not one per weight (64)
    assert loads["LDG.E.128"] >= wide, loads
    assert loads["LDG.E.U16"] <= 4, loads
    if any(f in name for f in ("int4", "int3", "int2")):  # codes read 16 (int3: 4) bytes at a time, never one
        assert not any(k.startswith("LDG.E.U8") or k.startswith("LDG.E.S8") for k in loads), loads
    if "int3" in name:  # three 32-bit words per four units (12 bytes): 24 bytes a row of a group
        # measured: 12 (gate_up: 16 rows x 192 bytes, gate and up, over 128 threads) and 7 (down: 8 x 384, 6 of codes)
        assert loads["LDG.E"] >= (12 if "gate_up" in name else 6), loads
