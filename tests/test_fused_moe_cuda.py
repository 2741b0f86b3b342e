"""The fused MoE kernel compiled for a GPU: against the float64 reference, and inside swapmoe's captured
decode graph. Skipped without CUDA (CI has none); the CPU tests run it under Triton's interpreter
(tests/test_fused_moe.py)."""

from __future__ import annotations

import pytest
import torch

import swapmoe
from swapmoe.fused import ACT_GPT_OSS, ACT_SILU, FusedForward
from swapmoe.kernels.reference import reference_experts
from tests.test_cuda import _greedy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["silu", "gpt_oss"])
def test_kernel_on_cuda_matches_the_float64_reference(dtype, layout):
    from swapmoe.kernels.fused_moe import ExpertTensors, fused_experts

    S, H, N, T, K = 8, 256, 192, 2, 4
    gpt = layout == "gpt_oss"
    g = torch.Generator().manual_seed(0)
    gu = torch.randn(S, 2 * N, H, generator=g) / H**0.5  # [S, 2N, H]
    dn = torch.randn(S, H, N, generator=g) / N**0.5  # [S, H, N]
    if gpt:
        gu, dn = gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous()
    bias = (torch.randn(S, 2 * N, generator=g) * 0.1, torch.randn(S, H, generator=g) * 0.1) if gpt else (None, None)
    ex = ExpertTensors(*(None if t is None else t.to("cuda", dtype) for t in (gu, dn, *bias)),
                       transposed=gpt, interleaved=gpt)
    ex.gate_up[S - 1] = float("nan")  # reached only by the skipped terms (id S), if they read at all
    ex.down[S - 1] = float("nan")
    x = torch.randn(T, H, generator=g).to("cuda", dtype)
    ids = torch.tensor([[0, 3, S, 5], [2, S, 2, 6]], device="cuda")
    w = torch.rand(T, K, generator=g).cuda()
    act = ACT_GPT_OSS if gpt else ACT_SILU
    out = fused_experts(x, ids, w, ex, act, limit=1.0)
    ref = reference_experts(x, ids, w, ex, act, limit=1.0)
    assert torch.isfinite(out).all()
    # float32 accumulation, then one rounding to the output dtype (round to nearest: half an ulp)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-23
    assert ((out.double() - ref).abs() <= ref.abs() * ulp + 1e-5 * ref.abs().max()).all()


@pytest.mark.parametrize("group", [64, 48])  # whole groups per loop step (int3: as 32-bit words); a unit at a time
@pytest.mark.parametrize("fmt", ["int4", "int3", "int2"])
def test_packed_kernel_on_cuda_matches_the_float64_reference(fmt, group):
    """int4, int3 and int2 slots compiled for the GPU (the unpacking: int4's nibbles, int2's four codes a byte,
    int3's 24-bit units from 32-bit words or from their bytes; the zero points), against the float64 reference
    on swapmoe.quant's decoding of the same parts, with skipped terms next to NaN scales."""
    from swapmoe.kernels.fused_moe import ExpertTensors, _group_tiles, fused_experts
    from swapmoe.quant import quantise

    S, H, N, T, K = 8, 384, 192, 2, 4
    g = torch.Generator().manual_seed(0)
    gu = quantise((torch.randn(S, 2 * N, H, generator=g) / H**0.5).cuda(), fmt, group=group)  # [S, 2N, H*bits/8]
    dn = quantise((torch.randn(S, H, N, generator=g) / N**0.5).cuda(), fmt, group=group)  # [S, H, N*bits/8]
    ex = ExpertTensors(gu["q"], dn["q"], gate_up_scale=gu["scale"], down_scale=dn["scale"],
                       gate_up_zero=gu["zero"], down_zero=dn["zero"], bits=int(fmt[-1]))
    assert _group_tiles(ex.gate_up_scale, group, 512, ex.gate_up, ex.bits) == (64 if group == 64 else 0)
    for t in (ex.gate_up_scale, ex.down_scale, ex.gate_up_zero, ex.down_zero):
        t[S - 1] = float("nan")  # reached only by the skipped terms (id S), if they read at all
    x = torch.randn(T, H, generator=g).to("cuda", torch.bfloat16)
    ids = torch.tensor([[0, 3, S, 5], [2, S, 2, 6]], device="cuda")
    w = torch.rand(T, K, generator=g).cuda()
    out = fused_experts(x, ids, w, ex)
    ref = reference_experts(x, ids, w, ex)
    assert torch.isfinite(out).all()
    ulp = 2.0**-8  # float32 accumulation, then one rounding to bfloat16 (round to nearest: half an ulp)
    assert ((out.double() - ref).abs() <= ref.abs() * ulp + 1e-5 * ref.abs().max()).all()


def _checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, OlmoeConfig

    cfg = OlmoeConfig(hidden_size=128, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=4, num_experts=16, num_experts_per_tok=4, vocab_size=256,
                      max_position_embeddings=1024)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path)
    return tmp_path




@pytest.mark.parametrize(("expert_dtype", "budget"), [(None, "50%"), ("int8", "50%"), ("int4", "12.5%"),
                                                      ("int3", "12.5%"), ("int2", "12.5%")])
def test_graph_decode_captures_the_fused_kernel(tmp_path, expert_dtype, budget):
    """At 50% (int4, int3, int2: 12.5%, under all of the experts) on CUDA with the default ``moe_kernel``
    the fused kernel serves every virtualised layer, the decode step is captured with it, and a replay
    gives what the same kernels give in eager forwards, bit for bit."""
    from swapmoe.engine.decoder import Decoder

    path = _checkpoint(tmp_path)
    model = swapmoe.load(path, budget, device="cuda", dtype=torch.bfloat16, swaps_per_update=0,
                         expert_dtype=expert_dtype)
    fused = [st.layer.experts.__dict__.get("forward") for st in model.swapmoe.layers]
    assert all(isinstance(f, FusedForward) for f in fused)
    assert all((f.quantised is not None) == (expert_dtype is not None) for f in fused)
    if expert_dtype in ("int4", "int3", "int2"):
        assert all(st.pool is not None and st.pool.num_slots < 16 for st in model.swapmoe.layers)
    graph = Decoder(model, "graph")
    prompt = list(range(3, 40))
    g_tokens, g_rows = _greedy(graph, prompt, 48)
    assert graph.graphs_captured == 1 and graph.mode == "graph"
    calls = sum(f.calls for f in fused)
    e_tokens, e_rows = _greedy(Decoder(model, "static"), prompt, 48)
    assert sum(f.calls for f in fused) - calls == 48 * len(fused)  # every eager decode step took it
    assert g_tokens == e_tokens
    for a, b in zip(g_rows, e_rows, strict=True):
        assert torch.equal(a, b)
    default = swapmoe.load(path, "50%", device="cuda", dtype=torch.bfloat16)  # auto is the default
    assert all(isinstance(st.layer.experts.__dict__.get("forward"), FusedForward) for st in default.swapmoe.layers)
    off = swapmoe.load(path, "50%", device="cuda", dtype=torch.bfloat16, moe_kernel="transformers")
    assert not any(isinstance(st.layer.experts.__dict__.get("forward"), FusedForward) for st in off.swapmoe.layers)


def test_compiled_graph_decode_keeps_the_fused_kernel(tmp_path):
    """``compile_step`` with ``moe_kernel="auto"``: inductor compiles the step around the kernel (one opaque
    operator, swapmoe.kernels.fused_op), the compile does not fall back to the uncompiled step, and the
    captured compiled step gives the logits of eager steps with the same kernel on the same tokens (within
    bf16 rounding: inductor fuses the norms and residuals around the experts)."""
    from swapmoe.engine.decoder import Decoder

    path = _checkpoint(tmp_path)
    model = swapmoe.load(path, "50%", device="cuda", dtype=torch.bfloat16, swaps_per_update=0, moe_kernel="auto")
    fused = [st.layer.experts.__dict__.get("forward") for st in model.swapmoe.layers]
    graph = Decoder(model, "graph", compile_step=True)
    prompt = list(range(3, 40))
    tokens, rows = _greedy(graph, prompt, 32)
    assert graph.compiled is not None and graph.compiled.compiles == 1, "the step's compile fell back"
    assert graph.graphs_captured == 1 and "swapmoe.fused_experts" in graph.compiled.ops
    assert all(f.calls == 0 for f in fused)  # counted in eager calls only: a count read while tracing recompiles
    static = Decoder(model, "static")
    logits = static.prefill(prompt, max_new_tokens=32)
    worst = 0.0
    for token, row in zip(tokens, rows, strict=True):
        worst = max(worst, (static.read_logits(logits) - row).abs().max().item())
        logits = static.step(token)  # teacher-forced on the graph's tokens
    print(f"compiled graph with the fused kernel vs eager fused steps: worst |dlogit| {worst:.4f}")
    assert worst <= 0.0625  # bf16 logits of O(1-10): a few ulps; a wrong kernel or a stale slot is O(1)


def test_registered_implementation_runs_the_fused_kernel_on_cuda():
    """``model.set_experts_implementation("swapmoe_fused")`` on a plain transformers model: a decode-sized
    call takes the fused kernel (float32, so the comparison with grouped_mm is tight), a prefill grouped_mm."""
    from transformers import AutoModelForCausalLM, OlmoeConfig
    from transformers.integrations.moe import ExpertsInterface

    from swapmoe.fused import REGISTERED_NAME, register_experts_implementation

    cfg = OlmoeConfig(hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, num_experts=16, num_experts_per_tok=4, vocab_size=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).cuda().eval()
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1)).cuda()  # 80 terms
    try:
        with torch.no_grad():
            want = model(ids).logits
            step = model(ids[:, :1]).logits  # one token: K=4 terms
            model.set_experts_implementation(register_experts_implementation())
            torch.testing.assert_close(model(ids[:, :1]).logits, step, rtol=1e-4, atol=1e-4)
            assert torch.equal(model(ids).logits, want)  # more than MAX_TERMS terms: grouped_mm
    finally:
        ExpertsInterface._global_mapping.pop(REGISTERED_NAME, None)
