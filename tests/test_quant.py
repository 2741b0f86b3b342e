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
    parse_expert_dtype,
    quantise,
)


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


def test_bf16_is_a_cast_and_zero_groups_stay_zero():
    w = torch.tensor([[1.0 + 2**-10, -3.0]])
    assert torch.equal(dequantise(quantise(w, "bf16"), "bf16", torch.float32), w.bfloat16().float())
    zeros = torch.zeros(2, 8)
    for fmt in ("int8", "int4"):
        parts = quantise(zeros, fmt, group=4)
        assert torch.equal(parts["scale"], torch.ones_like(parts["scale"]))  # no 0/0
        assert torch.equal(dequantise(parts, fmt, torch.float32), zeros)


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
    lo, hi = x.amin(-1), x.amax(-1)
    s = ((hi - lo) / 15).half().double()
    s[s == 0] = 1
    z = (-lo / s).half().double()
    q = torch.round(x / s[..., None] + z[..., None]).clamp(0, 15)
    return q.reshape(w.shape), ((q - z[..., None]) * s[..., None]).reshape(w.shape)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(3, 16, 128), (2, 5, 24)])  # groups of 64, and one group per row
def test_matches_a_float64_reference(fmt, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05
    parts = quantise(w, fmt)
    q_ref, w_ref = _reference(w, fmt, GROUP_SIZE)
    got = dequantise(parts, fmt, torch.float64)
    if fmt == "int4":
        q = torch.stack((parts["q"] & 15, parts["q"] >> 4), -1).reshape(shape).double()
    else:
        q = parts["q"].double()
    # float32 and float64 may round a value that lies within 1e-7 of a half-step differently
    assert (q - q_ref).abs().max() <= 1 and (q != q_ref).double().mean() < 1e-3
    same = q == q_ref
    assert torch.allclose(got[same], w_ref[same], rtol=1e-6, atol=1e-9)
    # every value within half a step of its original (and the range's ends within float16 rounding)
    n = shape[-1]
    step = parts["scale"].double().repeat_interleave(GROUP_SIZE if n % GROUP_SIZE == 0 else n, dim=-1)
    assert ((got - w.double()).abs() <= 0.5 * step * (1 + 2**-9) + 1e-7).all()


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
    int8 = ExpertLayout.of(tensors, "int8").expert_bytes() - 128 * 4
    int4 = ExpertLayout.of(tensors, "int4").expert_bytes() - 128 * 4
    assert int8 == weights * (1 + 2 / GROUP_SIZE) and int4 == weights * (0.5 + 4 / GROUP_SIZE)


def test_expert_dtype_names():
    assert parse_expert_dtype(None, torch.float32) is None
    assert parse_expert_dtype("bf16", torch.bfloat16) is None  # the model's own dtype: nothing changes
    assert parse_expert_dtype("bf16", torch.float32) == "bf16"
    assert parse_expert_dtype("INT8", torch.bfloat16) == "int8"
    with pytest.raises(SwapMoEError, match="unknown expert dtype 'int3'.*int8"):
        parse_expert_dtype("int3", torch.bfloat16)
    with pytest.raises(SwapMoEError, match="even last dim"):
        ExpertLayout.of({"w": torch.zeros(2, 4, 5)}, "int4").expert_bytes()


def test_lowest_fitting_takes_the_least_lossy_format_that_fits():
    totals = {None: 100, "int8": 52, "int4": 28}
    assert lowest_fitting(100, totals) is None
    assert lowest_fitting(99, totals) == "int8"
    assert lowest_fitting(52, totals) == "int8"
    assert lowest_fitting(30, totals) == "int4"
    assert lowest_fitting(10, totals) == "int4"  # nothing fits: the most compact
