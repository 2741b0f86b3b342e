"""Group-wise expert quantisation (swapmoe.quant): literal round trips and a float64 reference."""

import pytest
import torch

from swapmoe.errors import SwapMoEError
from swapmoe.quant import (
    FORMATS,
    GROUP_SIZE,
    ExpertLayout,
    dequantise,
    lowest_fitting,
    pack,
    parse_expert_dtype,
    quantise,
    refine_zero,
    unpack,
)
from tests.repo_scripts import load_script


def test_int8_literal_round_trip():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0]])
    parts = quantise(w, "int8", group=4)
    s = torch.tensor(2.0 / 127).half()  # absmax / 127, stored in float16
    # 1 / s = 63.5 -> 64 (round half to even), 0.5 / s = 31.75 -> 32
    assert torch.equal(parts["q"], torch.tensor([[64, -127, 32, 0]], dtype=torch.int8))
    assert torch.equal(parts["scale"], s.reshape(1, 1))
    expected = torch.tensor([[64.0, -127.0, 32.0, 0.0]]) * s.float()
    assert torch.equal(dequantise(parts, "int8", torch.float32), expected)


def test_int4_literal_round_trip():
    # min -3, max 4.5: s = 7.5 / 15 = 0.5 and z = 3 / 0.5 = 6, both exact in float16
    w = torch.tensor([[4.5, -3.0, 0.25, 1.0]])
    parts = quantise(w, "int4", group=4)
    # codes 15, 0, 6 (0.5 + 6 = 6.5 -> 6, half to even), 8; packed low nibble first: 15 | 0 << 4, 6 | 8 << 4
    assert torch.equal(parts["q"], torch.tensor([[15, 134]], dtype=torch.uint8))
    assert parts["scale"].item() == 0.5 and parts["zero"].item() == 6.0
    assert torch.equal(dequantise(parts, "int4", torch.float32), torch.tensor([[4.5, -3.0, 0.0, 1.0]]))


def test_int3_and_int2_packing_literals():
    # int3: eight codes in a little-endian 24-bit word, code i in bits 3i..3i+2:
    # 1 | 2<<3 | 3<<6 | 4<<9 | 5<<12 | 6<<15 | 7<<18 = 0x1F58D1 -> bytes 0xD1, 0x58, 0x1F
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]])
    assert torch.equal(pack(codes, "int3"), torch.tensor([[0xD1, 0x58, 0x1F]], dtype=torch.uint8))
    # int2: four codes per byte, code i in bits 2i..2i+1: 1 | 2<<2 | 3<<4 | 0<<6 = 57; 3,3,3,3 = 255
    codes2 = torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]])
    assert torch.equal(pack(codes2, "int2"), torch.tensor([[57, 255]], dtype=torch.uint8))
    assert torch.equal(unpack(pack(codes, "int3"), "int3"), codes.float())
    assert torch.equal(unpack(pack(codes2, "int2"), "int2"), codes2.float())
    gen = torch.Generator().manual_seed(0)
    for fmt, bits in (("int4", 4), ("int3", 3), ("int2", 2)):  # every code at every position
        q = torch.randint(0, 2**bits, (3, 5, 48), generator=gen)
        assert pack(q, fmt).shape == (3, 5, 48 * bits // 8)
        assert torch.equal(unpack(pack(q, fmt), fmt), q.float())


def test_int2_literal_round_trip():
    # min -1.5, max 1.5: s = 3 / 3 = 1, z = 1.5; codes 0, 2 (1.5 -> 2, half to even), 3, 2 (2.25)
    w = torch.tensor([[-1.5, 0.0, 1.5, 0.75]])
    for refine in (False, True):  # nothing to clip: HQQ keeps the min-max zero point
        parts = quantise(w, "int2", group=4, refine=refine)
        assert torch.equal(parts["q"], torch.tensor([[0 | 2 << 2 | 3 << 4 | 2 << 6]], dtype=torch.uint8))
        assert parts["scale"].item() == 1.0 and parts["zero"].item() == 1.5
        assert torch.equal(dequantise(parts, "int2", torch.float32), torch.tensor([[-1.5, 0.5, 1.5, 0.5]]))


def test_hqq_zero_point_clips_an_outlier_and_lowers_the_error():
    # one outlier stretches the range: s = 3 / 3 = 1, so min-max codes put 0..0.6 on 0 or 1 (error 0.2375);
    # the refined zero point moves the grid so that the seven small values share one level
    w = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 3.0]])
    plain = quantise(w, "int2", group=8, refine=False)
    hqq = quantise(w, "int2", group=8)  # int2's default
    assert plain["zero"].item() == 0.0 and hqq["zero"].item() < -0.2  # the grid shifted up by ~0.24
    assert torch.equal(plain["scale"], hqq["scale"])  # only the zero point moves
    err = {k: (dequantise(p, "int2", torch.float32) - w).abs().mean().item() for k, p in (("plain", plain), ("hqq", hqq))}
    assert err["plain"] == pytest.approx(0.2375) and err["hqq"] < 0.19


def test_refined_zero_point_never_loses_to_min_max_and_depends_on_its_group_only():
    w = torch.randn(4, 8, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    w[0, 0, 3] = 1.0  # an outlier
    for fmt in ("int3", "int2"):
        hqq, plain = quantise(w, fmt), quantise(w, fmt, refine=False)
        def group_err(p, fmt=fmt):
            return (dequantise(p, fmt, torch.float32) - w).abs().reshape(4, 8, 2, 64).mean(-1)  # [4, 8, groups]
        # per group, the refined zero point is no worse (up to its rounding to float16), and better overall
        assert (group_err(hqq) <= group_err(plain) * (1 + 2**-8) + 1e-7).all()
        assert group_err(hqq).mean() < 0.97 * group_err(plain).mean()
        # one expert alone quantises as it does among all (the swapper quantises one expert at a time)
        one = quantise(w[2], fmt)
        assert all(torch.equal(one[k], hqq[k][2]) for k in one)


def test_bf16_is_a_cast_and_zero_groups_stay_zero():
    w = torch.tensor([[1.0 + 2**-10, -3.0]])
    assert torch.equal(dequantise(quantise(w, "bf16"), "bf16", torch.float32), w.bfloat16().float())
    zeros = torch.zeros(2, 8)
    for fmt in ("int8", "int4", "int3", "int2"):
        parts = quantise(zeros, fmt, group=4)
        assert torch.equal(parts["scale"], torch.ones_like(parts["scale"]))  # no 0/0
        assert torch.equal(dequantise(parts, fmt, torch.float32), zeros)


QMAX = {"int4": 15, "int3": 7, "int2": 3}


def _hqq_zero_reference(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int) -> torch.Tensor:
    """HQQ's zero-point steps (hqq.core.optimize, lp 0.7, beta 10 growing by 1.01, 20 steps) in float64,
    keeping each group's step of lowest mean absolute error."""
    zero, best, best_err, beta = z[..., None], z[..., None], torch.full_like(z[..., None], float("inf")), 10.0
    for _ in range(20):
        q = torch.round(x / s[..., None] + zero).clamp(0, qmax)
        d = x - (q - zero) * s[..., None]
        err = d.abs().mean(-1, keepdim=True)
        best, best_err = torch.where(err < best_err, zero, best), torch.minimum(err, best_err)
        e = d.sign() * (d.abs() - d.abs().add(1e-8).pow(-0.3) / beta).clamp(min=0)
        zero = (q - (x - e) / s[..., None]).mean(-1, keepdim=True)
        beta *= 1.01
    return best[..., 0]


def _reference(w: torch.Tensor, fmt: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantised values in float64, from the formulas of the module docstring (the scale and
    zero point rounded to float16 first, as stored)."""
    n = w.shape[-1]
    g = group if n % group == 0 else n
    x = w.double().reshape(*w.shape[:-1], n // g, g)
    if fmt == "int8":
        s = (x.abs().amax(-1) / 127).half().double()
        s[s == 0] = 1
        q = torch.round(x / s[..., None]).clamp(-127, 127)
        return q.reshape(w.shape), (q * s[..., None]).reshape(w.shape)
    qmax = QMAX[fmt]
    lo, hi = x.amin(-1), x.amax(-1)
    s = ((hi - lo) / qmax).half().double()
    s[s == 0] = 1
    z = -lo / s
    if fmt in ("int3", "int2"):
        z = _hqq_zero_reference(x, s, z, qmax)
    z = z.half().double()
    q = torch.round(x / s[..., None] + z[..., None]).clamp(0, qmax)
    return q.reshape(w.shape), ((q - z[..., None]) * s[..., None]).reshape(w.shape)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int3", "int2"])
@pytest.mark.parametrize("shape", [(3, 16, 128), (2, 5, 24)])  # groups of 64, and one group per row
def test_matches_a_float64_reference(fmt, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05
    parts = quantise(w, fmt)
    q_ref, w_ref = _reference(w, fmt, GROUP_SIZE)
    got = dequantise(parts, fmt, torch.float64)
    n = shape[-1]
    g = GROUP_SIZE if n % GROUP_SIZE == 0 else n
    q = unpack(parts["q"], fmt).reshape(shape).double() if fmt in QMAX else parts["q"].double()
    compared = torch.ones(shape, dtype=torch.bool)
    if fmt in ("int3", "int2"):
        # HQQ's steps in float32 and float64 end on the same float16 zero point in nearly every group; where a
        # rounding tie sends them apart, the two stay within a tenth of a step (zero points are in steps)
        z_ref = torch.tensor(_reference_zero(w, fmt, g))
        agree = parts["zero"].double() == z_ref  # [..., N/G]
        assert agree.double().mean() >= 0.9 and (parts["zero"].double() - z_ref).abs().max() < 0.1
        compared = agree.repeat_interleave(g, dim=-1)
    q, q_ref, got, w_ref, w = q[compared], q_ref[compared], got[compared], w_ref[compared], w.double()[compared]
    # float32 and float64 may round a value that lies within 1e-7 of a half-step differently
    assert (q - q_ref).abs().max() <= 1 and (q != q_ref).double().mean() < 1e-3
    same = q == q_ref
    assert torch.allclose(got[same], w_ref[same], rtol=1e-6, atol=1e-9)
    step = parts["scale"].double().repeat_interleave(g, dim=-1)[compared]
    if fmt in ("int8", "int4"):  # every value within half a step of its original (ends: float16 rounding)
        assert ((got - w).abs() <= 0.5 * step * (1 + 2**-9) + 1e-7).all()
    else:  # HQQ may clip a group's ends, by at most a step
        assert ((got - w).abs() <= 1.5 * step).all()


def _reference_zero(w: torch.Tensor, fmt: str, g: int) -> list:
    x = w.double().reshape(*w.shape[:-1], w.shape[-1] // g, g)
    lo, hi = x.amin(-1), x.amax(-1)
    s = ((hi - lo) / QMAX[fmt]).half().double()
    return _hqq_zero_reference(x, s, -lo / s, QMAX[fmt]).half().double().tolist()


def test_layout_bytes_are_the_bytes_of_the_parts():
    tensors = {"gate_up_proj": torch.randn(4, 128, 256), "down_proj": torch.randn(4, 256, 64),
               "gate_up_proj_bias": torch.randn(4, 128)}
    for fmt in FORMATS:
        layout = ExpertLayout.of(tensors, fmt)
        parts = layout.encode({n: t[1] for n, t in tensors.items()})  # one expert
        assert layout.expert_bytes() == sum(t.numel() * t.element_size() for t in parts.values())
        assert set(parts) == set(layout.parts())
        assert all(tuple(t.shape) == layout.parts()[n][0][1:] for n, t in parts.items())
        assert torch.equal(parts["gate_up_proj_bias"], tensors["gate_up_proj_bias"][1])  # biases kept
        back = layout.decode(layout.encode(tensors))
        assert back["down_proj"].shape == tensors["down_proj"].shape
    weights = 128 * 256 + 256 * 64
    per_weight = {"int8": 1 + 2 / GROUP_SIZE, "int4": 0.5 + 4 / GROUP_SIZE, "int3": 0.375 + 4 / GROUP_SIZE,
                  "int2": 0.25 + 4 / GROUP_SIZE}
    for fmt, b in per_weight.items():
        assert ExpertLayout.of(tensors, fmt).expert_bytes() - 128 * 4 == weights * b
    # FORMATS runs from the most bytes to the fewest (quantized-all and the planner search it in order)
    sizes = [ExpertLayout.of(tensors, f).expert_bytes() for f in FORMATS]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)


def test_expert_dtype_names():
    assert parse_expert_dtype(None, torch.float32) is None
    assert parse_expert_dtype("bf16", torch.bfloat16) is None  # the model's own dtype: nothing changes
    assert parse_expert_dtype("bf16", torch.float32) == "bf16"
    assert parse_expert_dtype("INT8", torch.bfloat16) == "int8"
    assert parse_expert_dtype("int3", torch.bfloat16) == "int3" and parse_expert_dtype("Int2", torch.float32) == "int2"
    with pytest.raises(SwapMoEError, match="unknown expert dtype 'int1'.*int8.*int2"):
        parse_expert_dtype("int1", torch.bfloat16)
    with pytest.raises(SwapMoEError, match="multiple of 2, got 5"):
        ExpertLayout.of({"w": torch.zeros(2, 4, 5)}, "int4").expert_bytes()
    with pytest.raises(SwapMoEError, match="int3 packs 8 values into 3 bytes.*multiple of 8, got 12.*int8"):
        ExpertLayout.of({"w": torch.zeros(2, 4, 12)}, "int3").expert_bytes()
    with pytest.raises(SwapMoEError, match="int2 packs 4 values into 1 byte and .*multiple of 4, got 6"):
        quantise(torch.zeros(4, 6), "int2")


def test_lowest_fitting_takes_the_least_lossy_format_that_fits():
    totals = {None: 100, "int8": 52, "int4": 28, "int3": 22, "int2": 16}
    assert lowest_fitting(100, totals) is None
    assert lowest_fitting(99, totals) == "int8"
    assert lowest_fitting(52, totals) == "int8"
    assert lowest_fitting(30, totals) == "int4"
    assert lowest_fitting(27, totals) == "int3"
    assert lowest_fitting(16, totals) == "int2"
    assert lowest_fitting(10, totals) == "int2"  # nothing fits: the most compact


def _refine_zero_before_the_buffers(x, s, z, qmax, iters=20):
    """refine_zero as it was before its in-place, chunked form (commit ffe2313; kept in
    benchmarks/quant_speed.py, which times the two): the reference the faster one must match bit for
    bit (same operations, full-size temporaries)."""
    return load_script("benchmarks/quant_speed.py").refine_zero_full_size(x, s, z, qmax, iters)


@pytest.mark.parametrize("qmax", [7, 3])
def test_refine_zero_in_chunks_is_bit_identical_to_the_full_size_form(qmax):
    gen = torch.Generator().manual_seed(3)
    # unit-scale weights (the shrinkage clips outliers), model-scale ones (0.02), a few huge outliers,
    # a constant group and a zero one
    w = torch.randn(3, 40, 128, generator=gen)
    w[1] *= 0.02
    w[2, 5, 17] = 40.0
    w[2, 6, :64] = 0.5
    w[2, 7, 64:] = 0.0
    x = w.reshape(3, 40, 2, 64)  # [E, rows, N/G, G]
    lo, hi = x.amin(-1), x.amax(-1)
    s = ((hi - lo) / qmax).half()
    s = torch.where(s == 0, torch.ones_like(s), s).float()
    z = -lo / s
    want = _refine_zero_before_the_buffers(x, s, z, qmax)
    # default (cache-sized: one chunk here), one group per chunk, 3 groups a chunk (a short last one)
    for chunk in (None, 64, 3 * 64, 100):
        got = refine_zero(x, s, z, qmax, chunk_values=chunk)
        assert got.shape == want.shape and torch.equal(got, want), chunk
    assert not torch.equal(want, z)  # the refinement moved zero points: the comparison has teeth


@pytest.mark.parametrize("fmt", ["int3", "int2", "int4", "int8", "bf16"])
def test_encode_in_chunks_of_rows_is_bit_identical_to_one_call(fmt):
    gen = torch.Generator().manual_seed(4)
    tensors = {"gate_up_proj": torch.randn(3, 12, 128, generator=gen).to(torch.bfloat16),
               "down_proj": (0.02 * torch.randn(3, 64, 24, generator=gen)).to(torch.bfloat16),  # G = 24
               "gate_up_proj_bias": torch.randn(3, 12, generator=gen).to(torch.bfloat16)}
    layout = ExpertLayout.of(tensors, fmt)
    whole = layout.encode(tensors)
    cpu = torch.device("cpu")
    # 1 row a chunk; 5 rows of 128 (uneven: 36 rows); more than the weight (one chunk); one expert alone
    for chunk in (1, 5 * 128, 10**9):
        got = layout.encode(tensors, compute_device=cpu, out_device=cpu, chunk_values=chunk)
        assert set(got) == set(whole)
        for name, t in whole.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), (chunk, name)
    one = layout.encode({n: t[1] for n, t in tensors.items()}, compute_device=cpu, chunk_values=128)
    assert all(torch.equal(one[n], t[1]) for n, t in whole.items())


def test_quantising_at_load_figures_are_its_result_file():
    """docs/quantization.md's "Quantising at load" quotes benchmarks/quant_speed.py's result file."""
    import json
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    record = json.loads((repo / "docs" / "results" / "quant" / "load-speed.json").read_text())
    page = (repo / "docs" / "quantization.md").read_text(encoding="utf-8")
    section = " ".join(page.split("## Quantising at load", 1)[1].split("\n## ", 1)[0].split())
    q = record["quantise"]
    assert q["int3"]["bit_identical"] and q["int2"]["bit_identical"]
    for fmt in ("int3", "int2"):
        before, after = q[fmt]["before"]["best_s"], q[fmt]["after"]["best_s"]
        assert (f"{before:.1f} s before and {after:.1f} s after for {fmt} ({before / after:.1f}x)" in section
                or f"{before:.1f} s and {after:.1f} s for {fmt} ({before / after:.1f}x)" in section), fmt
    load = record["load"]["rounds"]
    b, a = load["before"][0], load["after"][0]
    assert f"took {b['total_s']:.1f} s before and {a['total_s']:.1f} s after" in section
    assert f"phase {b['experts_s']:.1f} s and {a['experts_s']:.1f} s" in section


def test_weights_that_require_grad_quantise_as_their_data():
    """A model's parameters (requires_grad) quantise as their values do: the in-place refinement works."""
    w = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(5))
    for fmt in ("int3", "int2"):
        got = quantise(torch.nn.Parameter(w.clone()), fmt)
        assert all(torch.equal(got[p], v) for p, v in quantise(w, fmt).items())
