"""Quantising experts on the GPU at load (``ExpertLayout.encode(compute_device=cuda)``): the parts match
the CPU's within the rounding of a reduction, chunks of rows change nothing, and a CUDA load quantises
its host store on the GPU. Skipped without CUDA (the lead runs it on the H200).

Tolerances: the CPU and the GPU sum a group's 64 values in different orders, so a mean (HQQ's error
and zero-point updates) may differ in its last bit. On the CPU, reversing each group's values (the same
kind of change) moved int3/int2 codes by one step for at most 3.3e-5 of weights, refined zero points
by at most 0.08 of a step (6.8-10.5% of groups by more than a float16 ulp at unit scale, 0.2-0.3% at
0.02), left the scales equal and the mean absolute error within 2e-7 (relative). The bounds below are
those with headroom; min-max zero points (int4) and scales are a single rounding: equal within an ulp.
"""

import pytest
import torch

from swapmoe.quant import PACKED_BITS, ExpertLayout, dequantise, unpack

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CODE_SHARE_TOL = 1e-3  # weights whose code differs (by one step at most)
ZERO_STEP_TOL = 0.25  # refined zero points: at most a quarter of a step apart
MAE_REL_TOL = 1e-3  # mean |w' - w|, GPU against CPU


def _olmoe_experts(n: int = 4, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """``n`` experts of OLMoE-1B-7B's shapes (hidden 2048, intermediate 1024), bfloat16."""
    gen = torch.Generator().manual_seed(0)
    return {"gate_up_proj": (scale * torch.randn(n, 2048, 2048, generator=gen)).to(torch.bfloat16),
            "down_proj": (scale * torch.randn(n, 2048, 1024, generator=gen)).to(torch.bfloat16)}


def _ulp16(t: torch.Tensor) -> torch.Tensor:
    """One float16 ulp at ``t`` (relative 2**-10; the subnormal step below 2**-14)."""
    return 2.0**-10 * t.float().abs().clamp_min(2.0**-14)


@pytest.mark.parametrize("scale", [0.02, 1.0])
@pytest.mark.parametrize("fmt", ["int3", "int2", "int4", "int8"])
def test_encode_on_the_gpu_matches_the_cpu_within_a_reduction_s_rounding(fmt, scale):
    tensors = _olmoe_experts(scale=scale)
    layout = ExpertLayout.of(tensors, fmt)
    cpu = layout.encode(tensors)
    # 1M values a chunk: several chunks per weight; the parts come back to the host
    gpu = layout.encode(tensors, compute_device=torch.device("cuda"), chunk_values=1 << 20)
    assert set(gpu) == set(cpu)
    for n, t in cpu.items():
        assert gpu[n].device.type == "cpu" and gpu[n].dtype == t.dtype and gpu[n].shape == t.shape, n
    for name, w in tensors.items():
        a = {p: cpu[f"{name}.{p}"] for p in ("q", "scale", "zero") if f"{name}.{p}" in cpu}
        b = {p: gpu[f"{name}.{p}"] for p in a}
        assert ((b["scale"].float() - a["scale"].float()).abs() <= _ulp16(a["scale"])).all(), name
        if fmt in PACKED_BITS:
            qa, qb = unpack(a["q"], fmt), unpack(b["q"], fmt)
            dz = (b["zero"].float() - a["zero"].float()).abs()  # in steps (codes)
            if fmt == "int4":  # min-max: one rounding
                assert (dz <= _ulp16(a["zero"])).all(), name
            else:
                assert dz.max() <= ZERO_STEP_TOL, (name, dz.max().item())
        else:
            qa, qb = a["q"].float(), b["q"].float()
        dq = (qb - qa).abs()
        assert dq.max() <= 1 and (dq > 0).float().mean() <= CODE_SHARE_TOL, (name, (dq > 0).float().mean().item())
        ea = (dequantise(a, fmt, torch.float32) - w.float()).abs().mean()
        eb = (dequantise(b, fmt, torch.float32) - w.float()).abs().mean()
        assert abs(eb / ea - 1) <= MAE_REL_TOL, (name, ea.item(), eb.item())


@pytest.mark.parametrize("fmt", ["int3", "int4"])
def test_chunks_on_the_gpu_are_bit_identical_to_one_call_there(fmt):
    tensors = _olmoe_experts(2)
    layout = ExpertLayout.of(tensors, fmt)
    cuda = torch.device("cuda")
    one = layout.encode({n: t.to(cuda) for n, t in tensors.items()})  # one call, on the GPU
    for chunk in (2048 * 3, 1 << 20):  # 3 rows a chunk (an uneven last one); 512 rows
        got = layout.encode(tensors, compute_device=cuda, out_device=cuda, chunk_values=chunk)
        for n, t in one.items():
            assert got[n].device.type == "cuda" and torch.equal(got[n], t), (chunk, n)


def test_a_cuda_load_quantises_its_host_store_on_the_gpu(tmp_path, monkeypatch):
    """``swapmoe.load(device="cuda", expert_dtype="int3")``: the host store holds the parts in host
    memory, as the GPU computed them; a full layer's parts are on the GPU."""
    import swapmoe
    import swapmoe.quant as quant
    from tests.tiny_models import make_checkpoint

    ckpt = make_checkpoint("qwen3_moe", tmp_path / "qwen3-moe")
    devices = []
    real = quant.quantise

    def recording(w, *args, **kwargs):
        devices.append(w.device.type)
        return real(w, *args, **kwargs)

    monkeypatch.setattr(quant, "quantise", recording)
    model = swapmoe.load(ckpt, "10%", expert_dtype="int3", device="cuda", cuda_graph=False)
    assert devices and set(devices) == {"cuda"}  # every weight quantised at load ran on the GPU
    monkeypatch.undo()
    for st in model.swapmoe.layers:
        host = st.pool.store.tensors
        assert host["gate_up_proj.q"].device.type == "cpu" and host["gate_up_proj.q"].dtype == torch.uint8
        assert st.pool.slots["gate_up_proj.q"].device.type == "cuda"
    full = swapmoe.load(ckpt, "100%", expert_dtype="int3", device="cuda", cuda_graph=False)
    fwd = full.swapmoe.layers[0].layer.experts.forward
    assert all(t.device.type == "cuda" for t in fwd.parts.values())
