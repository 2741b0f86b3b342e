"""The fused Triton MoE decode kernel (swapmoe.kernels.fused_moe) and its installation (swapmoe.fused).

The kernel runs under Triton's interpreter on CPU tensors: ``TRITON_INTERPRET=1`` is set by the
``kernels`` fixture only, which imports the kernel module afresh under it (Triton reads the variable
when a kernel is defined) and drops that module again afterwards, so that a later import in the same
process (a CUDA test) compiles the kernels for the GPU.

    T = tokens, K = experts per token, S = slots, H = hidden size, N = intermediate size
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from torch import nn

from swapmoe.fused import (
    ACT_GPT_OSS,
    ACT_SILU,
    MAX_TERMS,
    FusedForward,
    MoEKernelError,
    install,
    remove,
    unsupported,
    use_fused_kernel,
)
from swapmoe.kernels.reference import reference_experts
from swapmoe.quant import dequantise, pack, quantise

pytest.importorskip("triton")

KERNEL_MODULE = "swapmoe.kernels.fused_moe"


@pytest.fixture(scope="module")
def kernels():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        sys.modules.pop(KERNEL_MODULE, None)
        yield importlib.import_module(KERNEL_MODULE)
    sys.modules.pop(KERNEL_MODULE, None)


def _experts(kernels, S, H, N, *, transposed=False, interleaved=False, bias=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    gu = torch.randn(S, 2 * N, H, generator=g) / H**0.5  # [S, 2N, H]
    dn = torch.randn(S, H, N, generator=g) / N**0.5  # [S, H, N]
    if transposed:
        gu, dn = gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous()  # [S, H, 2N], [S, N, H]
    gb = torch.randn(S, 2 * N, generator=g) * 0.1 if bias else None
    db = torch.randn(S, H, generator=g) * 0.1 if bias else None
    gu, dn, gb, db = (None if t is None else t.to(dtype) for t in (gu, dn, gb, db))
    return kernels.ExpertTensors(gu, dn, gb, db, transposed=transposed, interleaved=interleaved)


def _packed_experts(kernels, fp, fmt, group):
    """``fp``'s weights as swapmoe.quant's parts in ``fmt`` (int4, int3, int2), in the kernels' ``ExpertTensors``."""
    gu, dn = quantise(fp.gate_up, fmt, group=group), quantise(fp.down, fmt, group=group)
    return kernels.ExpertTensors(gu["q"], dn["q"], gate_up_scale=gu["scale"], down_scale=dn["scale"],
                                 gate_up_zero=gu["zero"], down_zero=dn["zero"], bits=int(fmt[-1]))


def _inputs(T, K, H, ids, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)  # [T, H]
    w = torch.rand(T, K, generator=g)  # [T, K]
    return x, torch.tensor(ids, dtype=torch.long).view(T, K), w


# (T, K, ids): one decode token; several tokens sharing slots; the same slot twice in one token
CALLS = [(1, 4, [3, 0, 5, 1]), (3, 2, [1, 4, 4, 2, 1, 1]), (2, 3, [2, 2, 0, 5, 3, 3])]


@pytest.mark.parametrize(("T", "K", "ids"), CALLS)
@pytest.mark.parametrize("layout", ["silu", "gpt_oss"])
def test_kernel_matches_the_float64_reference(kernels, T, K, ids, layout):
    S, H, N = 6, 40, 24  # neither a multiple of the tiles: the masks at the edges matter
    gpt = layout == "gpt_oss"
    ex = _experts(kernels, S, H, N, transposed=gpt, interleaved=gpt, bias=gpt)
    x, idx, w = _inputs(T, K, H, ids)
    act = ACT_GPT_OSS if gpt else ACT_SILU
    out = kernels.fused_experts(x, idx, w, ex, act, alpha=1.702, limit=0.5)  # a limit the values reach
    ref = reference_experts(x, idx, w, ex, act, alpha=1.702, limit=0.5)
    assert out.dtype == torch.float32 and out.shape == (T, H)
    # float32 accumulation over H=40 and N=24 terms of O(1) values (measured max error ~5e-7)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_small_tiles_loop_over_several_blocks(kernels):
    """Tiles smaller than the dims: the k-loops run several iterations and the grid several blocks."""
    S, H, N = 4, 40, 24
    ex = _experts(kernels, S, H, N)
    x, idx, w = _inputs(2, 2, H, [0, 3, 2, 1])
    blocks = kernels.Blocks(gate_up_n=8, gate_up_k=16, down_n=16, down_k=8, down_warps=2)
    out = kernels.fused_experts(x, idx, w, ex, blocks=blocks)
    torch.testing.assert_close(out.double(), reference_experts(x, idx, w, ex), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["silu", "gpt_oss", "int4"])
def test_a_compiled_step_calls_the_kernel_as_one_opaque_operator(kernels, layout):
    """Under torch.compile the kernel is one node, torch.ops.swapmoe.fused_experts, with the output shape
    of its fake implementation; inductor compiles what surrounds it and leaves the launches to swapmoe
    (tracing into them failed in inductor's compile worker on the H200). Compiled == eager (up to
    inductor's own rounding of the norm around it: measured 1 float32 ulp). int4: the operator carries
    the zero points and the bits of the codes."""
    from swapmoe.kernels import fused_op

    S, H, N = 6, 40, 24
    gpt = layout == "gpt_oss"
    ex = _experts(kernels, S, H, N, transposed=gpt, interleaved=gpt, bias=gpt)
    if layout == "int4":
        ex = _packed_experts(kernels, ex, "int4", 64)
    x, idx, w = _inputs(1, 4, H, [3, 0, 6, 1])  # slot 6 >= S: a skipped term
    act = ACT_GPT_OSS if gpt else ACT_SILU

    def layer(x, idx, w):  # what a compiled decode step does around the experts call
        return fused_op.call(torch.nn.functional.rms_norm(x, (H,)), idx, w, ex, act, 1.702, 0.5) * 2.0 + x

    seen = []

    def backend(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True, dynamic=False)
    out, eager = compiled(x, idx, w), layer(x, idx, w)
    assert seen.count("swapmoe.fused_experts") == 1, seen
    assert out.shape == (1, H)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    ref = reference_experts(torch.nn.functional.rms_norm(x, (H,)), idx, w, ex, act, alpha=1.702, limit=0.5)
    torch.testing.assert_close(out.double(), ref * 2.0 + x.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["silu", "gpt_oss"])
def test_skipped_terms_read_nothing(kernels, layout):
    """Ids >= S (and negative) are skipped terms; the slots at both ends hold NaN (as a slot being
    written may) and only skipped terms could be mapped to them (clamped, or sent to slot 0): a read
    of either would put NaN in the output."""
    S, H, N = 5, 32, 16
    gpt = layout == "gpt_oss"
    ex = _experts(kernels, S, H, N, transposed=gpt, interleaved=gpt, bias=gpt)
    for t in (ex.gate_up, ex.down) + ((ex.gate_up_bias, ex.down_bias) if gpt else ()):
        t[0] = float("nan")
        t[S - 1] = float("nan")
    x, idx, w = _inputs(2, 3, H, [1, S, 2, S + 3, -1, 3])
    act = ACT_GPT_OSS if gpt else ACT_SILU
    out = kernels.fused_experts(x, idx, w, ex, act)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), reference_experts(x, idx, w, ex, act), rtol=1e-5, atol=1e-5)
    # a token whose every term is skipped gets exactly zero
    none = kernels.fused_experts(x[:1], torch.tensor([[S, S + 1, -1]]), w[:1], ex, act)
    assert torch.equal(none, torch.zeros_like(none))


def test_bf16_weights_round_once_at_the_end(kernels):
    S, H, N = 4, 64, 32
    ex = _experts(kernels, S, H, N, dtype=torch.bfloat16)
    x, idx, w = _inputs(1, 2, H, [2, 0], dtype=torch.bfloat16)
    out = kernels.fused_experts(x, idx, w, ex)
    assert out.dtype == torch.bfloat16
    ref = reference_experts(x, idx, w, ex)  # the same bf16 values, computed in float64
    # float32 accumulation, then one conversion to bfloat16 (8 significant bits). Triton's interpreter
    # converts by truncation (measured: every |out| <= |ref|, errors up to 0.8 ulp), a GPU rounds to
    # nearest: one ulp, 2**-7 relative, covers both
    err = (out.double() - ref).abs()
    assert (err <= ref.abs() * 2**-7 + 1e-6).all() and err.max() > 0


@pytest.mark.parametrize("step", [32, 8])  # whole groups per loop step (scale per group), or a scale per weight
def test_int8_weights_are_dequantised_inside_the_kernel(kernels, step):
    S, H, N = 4, 64, 32
    fp = _experts(kernels, S, H, N)
    gu, dn = quantise(fp.gate_up, "int8", group=16), quantise(fp.down, "int8", group=16)  # 4 and 2 groups a row
    ex = kernels.ExpertTensors(gu["q"], dn["q"], gate_up_scale=gu["scale"], down_scale=dn["scale"])
    for t in (ex.gate_up_scale, ex.down_scale):
        t[S - 1] = float("nan")  # only a skipped term could reach it
    x, idx, w = _inputs(2, 2, H, [0, 2, S, 1])
    blocks = kernels.Blocks(gate_up_k=step, down_k=step)  # several loop steps either way
    assert kernels._group_tiles(gu["scale"], 16, step) == (16 if step == 32 else 0)
    out = kernels.fused_experts(x, idx, w, ex, blocks=blocks)
    ref = reference_experts(x, idx, w, ex)  # dequantised as swapmoe.quant decodes them
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # the scales were applied per group: the float weights give a different (nearby) answer
    far = (reference_experts(x, idx, w, fp) - ref).abs().max()
    assert 1e-5 < far < 0.05


# (format, S, H, N, group, loop step). int4: whole groups per loop step (a scale and zero point per row and
# group), a scale and zero point per byte (step < group), and dims that are no multiple of the tiles with one
# group a row (swapmoe's G=64 on rows of 40 and 24 values; the default tiles). int3 and int2 besides: whole
# groups of 32 (int3 as 32-bit words: its groups of 32 codes and more are whole words) and of 16 (int3: a byte
# at a time) per step, and swapmoe's G=64 with the default tiles (a step past the row's end)
PACKED_CASES = ([("int4", 5, 64, 32, 16, 32), ("int4", 5, 64, 32, 16, 8), ("int4", 5, 40, 24, 64, None)]
                + [(fmt, *case) for fmt in ("int3", "int2") for case in
                   [(5, 128, 64, 32, 64), (5, 64, 32, 16, 32), (5, 64, 32, 16, 8), (5, 128, 64, 64, None),
                    (5, 40, 24, 64, None)]])
# how far the float weights' output is from the dequantised one, relative to the largest output: measured
# 0.08-0.21 (int4), 0.16-0.37 (int3), 0.46-0.67 (int2) on unit-variance rows
FAR = {"int4": (0.02, 0.5), "int3": (0.1, 1.0), "int2": (0.1, 1.0)}


@pytest.mark.parametrize(("fmt", "S", "H", "N", "group", "step"), PACKED_CASES)
def test_packed_weights_are_dequantised_inside_the_kernel(kernels, fmt, S, H, N, group, step):
    """int4, int3 and int2 slots (two codes a byte, eight in three bytes, four a byte; a scale and zero point
    per group) against the float64 reference on the weights as swapmoe.quant decodes them; the slots at both
    ends hold NaN scales and zero points, reachable only by skipped terms (ids S, S + 2, -1)."""
    fp = _experts(kernels, S, H, N)
    ex = _packed_experts(kernels, fp, fmt, group)
    codes, nbytes = kernels.UNITS[ex.bits]
    assert ex.dims() == (H, N) and ex.gate_up.dtype == torch.uint8 and ex.gate_up.shape[-1] == H * nbytes // codes
    for t in (ex.gate_up_scale, ex.down_scale, ex.gate_up_zero, ex.down_zero):
        t[0] = float("nan")
        t[S - 1] = float("nan")
    x, idx, w = _inputs(2, 3, H, [1, S, 2, S + 2, 3, -1])
    blocks = None if step is None else kernels.Blocks(gate_up_k=step, down_k=step)  # several loop steps
    g = group if H % group == 0 else H
    k = step or kernels.default_blocks(6, H, N, bits=ex.bits).gate_up_k
    whole = k % g == 0 and g & (g - 1) == 0 and (fmt != "int3" or g % 32 == 0)
    assert kernels._group_tiles(ex.gate_up_scale, g, k, ex.gate_up, ex.bits) == (g if whole else 0)
    out = kernels.fused_experts(x, idx, w, ex, blocks=blocks)
    assert torch.isfinite(out).all()
    ref = reference_experts(x, idx, w, ex)  # dequantised by swapmoe.quant.dequantise
    # float32 sums of O(1) values over H <= 128 (measured max error 1.0e-7 to 6.1e-7)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # the codes, scales and zero points were applied: the float weights give a different answer
    far = (reference_experts(x, idx, w, fp) - ref).abs().max() / ref.abs().max()
    assert FAR[fmt][0] < far < FAR[fmt][1]


def _stream_codes(row: bytes, bits: int, n: int) -> list[int]:
    """Code ``i`` of a packed row, by the definition: bits ``[bits*i, bits*(i+1))`` of the row read as one
    little-endian integer (what swapmoe.quant's units amount to)."""
    v = int.from_bytes(row, "little")
    return [(v >> (bits * i)) & ((1 << bits) - 1) for i in range(n)]


@pytest.mark.parametrize("fmt", ["int3", "int2"])
@pytest.mark.parametrize("step", [None, 8])  # int3 as 32-bit words (whole groups of 64); a unit at a time
def test_int3_and_int2_codes_are_read_in_quant_s_bit_order(kernels, fmt, step):
    """The down kernel on one-hot activations returns the weights themselves: with scale 1 and zero point 0,
    the codes. Literal bytes first (int2: byte 0xC9 = codes 1, 2, 0, 3; int3: bytes D1 58 1F = codes
    1..7, 0), as swapmoe.quant.pack writes them; then random bytes against the bit-stream definition."""
    bits = int(fmt[-1])
    H, I = 3, 64  # noqa: E741
    literal = {"int2": ([0xC9, 0x93], [1, 2, 0, 3, 3, 0, 1, 2]), "int3": ([0xD1, 0x58, 0x1F], [1, 2, 3, 4, 5, 6, 7, 0])}
    lit_bytes, lit_codes = literal[fmt]
    assert pack(torch.tensor([lit_codes]), fmt).tolist() == [lit_bytes]
    q = torch.randint(0, 256, (2, H, I * bits // 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    q[0, 0, :len(lit_bytes)] = torch.tensor(lit_bytes, dtype=torch.uint8)
    ones = torch.ones(2, H, 1, dtype=torch.float16)  # one group a row
    ex = kernels.ExpertTensors(q, q, gate_up_scale=ones, down_scale=ones, gate_up_zero=ones * 0,
                               down_zero=ones * 0, bits=bits)
    assert ex.dims() == (H, I)
    blocks = kernels.Blocks(down_k=step or 1024)
    assert kernels._group_tiles(ones, I, blocks.down_k, q, bits) == (I if step is None else 0)
    h = torch.eye(I)  # [J=I, I]: term t is column t
    for s in (0, 1):
        ids = torch.full((I, 1), s)
        out = kernels.down_sum(h, ids, torch.ones(I, 1), ex, torch.float32, blocks)  # [T=I, H]: out[t, r] = W[r, t]
        for r in range(H):
            assert out[:, r].tolist() == _stream_codes(bytes(q[s, r].tolist()), bits, I)
    assert out.shape == (I, H)
    first = kernels.down_sum(h, torch.zeros(I, 1, dtype=torch.long), torch.ones(I, 1), ex, torch.float32, blocks)
    assert first[:len(lit_codes), 0].tolist() == lit_codes


def test_int4_nibble_order_is_quant_s():
    """The reference decodes int4 with swapmoe.quant itself: byte b holds column 2b in its low nibble
    (the order the kernel's unpacking assumes), on literal codes."""
    q = torch.tensor([[0x21, 0xF0]], dtype=torch.uint8)  # columns: 1, 2, 0, 15
    parts = {"q": q, "scale": torch.tensor([[0.5]], dtype=torch.float16),
             "zero": torch.tensor([[1.0]], dtype=torch.float16)}
    assert dequantise(parts, "int4", torch.float64).tolist() == [[0.0, 0.5, -0.5, 7.0]]


def test_quantised_parts_the_kernel_cannot_read_are_refused(kernels):
    S, H, N = 2, 64, 32
    fp = _experts(kernels, S, H, N)
    ex = _packed_experts(kernels, fp, "int4", 16)
    x, idx, w = _inputs(1, 2, H, [0, 1])
    with pytest.raises(ValueError, match="zero points laid out as its scales"):
        kernels.fused_experts(x, idx, w, kernels.ExpertTensors(ex.gate_up, ex.down, gate_up_scale=ex.gate_up_scale,
                                                               down_scale=ex.down_scale, bits=4))
    with pytest.raises(ValueError, match="5 bits"):
        kernels.fused_experts(x, idx, w, kernels.ExpertTensors(**{**ex.__dict__, "bits": 5}))
    with pytest.raises(ValueError, match="int3 gate_up: want uint8 bytes of 8 codes in 3"):  # int4 bytes as int3
        kernels.fused_experts(x, idx, w, kernels.ExpertTensors(**{**ex.__dict__, "bits": 3}))
    with pytest.raises(ValueError, match="only int4"):
        kernels.fused_experts(x, idx, w, kernels.ExpertTensors(**{**ex.__dict__, "bits": 8}))
    with pytest.raises(ValueError, match=r"\[S, out, in\] layout only"):
        kernels.fused_experts(x, idx, w, kernels.ExpertTensors(**{**ex.__dict__, "transposed": True}))


# ------------------------------------------------------------ the module wrapper, on tiny models
@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "mixtral", "gpt_oss"])
def test_fused_forward_equals_transformers_grouped_mm(kernels, family):
    from swapmoe.families import find_moe_layers
    from tests.tiny_models import build_model

    model = build_model(family)
    ex = find_moe_layers(model)[0].experts
    E = ex.num_experts
    ex._is_expert_parallel = True  # transformers skips ids >= num_experts only in this mode
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, model.config.hidden_size, generator=g)  # [T, H]
    idx = torch.tensor([[1, 5], [E, 2], [7, 1]])  # one skipped term (id E)
    w = torch.rand(3, 2, generator=g)
    with torch.no_grad():
        want = type(ex).forward(ex, hidden, idx, w)
        fused = install(ex, devices=("cpu",))
        got = ex(hidden, idx, w)
    assert fused.calls == 1
    # the tiny models' experts give outputs of ~1e-3: a tolerance relative to them (measured error ~1e-7 of it)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    remove(ex)
    assert "forward" not in ex.__dict__


def test_calls_larger_than_a_decode_step_keep_transformers_kernels(kernels):
    from swapmoe.families import find_moe_layers
    from tests.tiny_models import build_model

    model = build_model("olmoe")
    ex = find_moe_layers(model)[0].experts
    T = MAX_TERMS // 2 + 1  # K = 2: one term past the limit
    hidden = torch.randn(T, model.config.hidden_size)
    idx = torch.randint(0, ex.num_experts, (T, 2))
    w = torch.rand(T, 2)
    with torch.no_grad():
        want = type(ex).forward(ex, hidden, idx, w)
        fused = install(ex, devices=("cpu",))
        got = ex(hidden, idx, w)
    assert fused.calls == 0 and torch.equal(got, want)


def test_unsupported_modules_say_why():
    from swapmoe.families import find_moe_layers
    from tests.tiny_models import build_model

    ex = find_moe_layers(build_model("olmoe"))[0].experts
    assert unsupported(ex) is None
    ex.act_fn = nn.GELU()
    assert "activation" in unsupported(ex)
    with pytest.raises(MoEKernelError, match="activation"):
        FusedForward(ex)
    assert "fused-experts module" in unsupported(nn.Linear(2, 2))
    ex2 = find_moe_layers(build_model("olmoe"))[0].experts
    ex2.has_post_expert_norm = True
    assert "norm" in unsupported(ex2)


# ------------------------------------------------------------ swapmoe.load(moe_kernel=...)
@pytest.fixture(scope="module")
def olmoe_checkpoint(tmp_path_factory):
    from tests.tiny_models import make_checkpoint

    return make_checkpoint("olmoe", tmp_path_factory.mktemp("olmoe"))


def _fused(model):
    return [st.layer.experts.__dict__.get("forward") for st in model.swapmoe.layers]


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory):
    from tests.mxfp4_models import make_mxfp4_checkpoint

    return make_mxfp4_checkpoint(tmp_path_factory.mktemp("mxfp4") / "gpt-oss")


def test_moe_kernel_choices(olmoe_checkpoint, mxfp4_checkpoint, monkeypatch):
    import inspect

    import swapmoe
    import swapmoe.fused
    from swapmoe.cli import build_parser

    assert inspect.signature(swapmoe.load).parameters["moe_kernel"].default == "auto"  # measured: it pays
    assert build_parser().parse_args(["generate", str(olmoe_checkpoint), "-m", "50%", "-p", "hi"]).moe_kernel == "auto"
    default = swapmoe.load(olmoe_checkpoint, "50%")  # auto on a CPU: transformers' kernels
    assert not any(isinstance(f, FusedForward) for f in _fused(default))
    cpu = swapmoe.load(olmoe_checkpoint, "50%", moe_kernel="auto")  # auto off CUDA: transformers' kernels
    assert not any(isinstance(f, FusedForward) for f in _fused(cpu))
    # auto on CUDA: only the layers swapmoe computes (the decision touches no GPU: the kernel is not called)
    full = swapmoe.load(olmoe_checkpoint, "100%")
    use_fused_kernel([(st.layer.experts, i == 0) for i, st in enumerate(full.swapmoe.layers)], "auto",
                     torch.device("cuda"))
    assert [isinstance(f, FusedForward) for f in _fused(full)] == [True, False]
    forced = swapmoe.load(olmoe_checkpoint, "100%", moe_kernel="triton")  # every layer, full ones too
    assert all(isinstance(f, FusedForward) and f.devices == ("cuda",) for f in _fused(forced))
    with pytest.raises(MoEKernelError, match="unknown MoE kernel"):
        swapmoe.load(olmoe_checkpoint, "50%", moe_kernel="cuda")
    assert use_fused_kernel([], "transformers", torch.device("cuda")) == []
    mxfp4 = swapmoe.load(mxfp4_checkpoint, "50%")  # a format the kernel does not read: refused even by name
    why = use_fused_kernel([(st.layer.experts, True) for st in mxfp4.swapmoe.layers], "triton", torch.device("cpu"))
    assert len(why) == len(mxfp4.swapmoe.layers) and all("experts held as mxfp4" in line for line in why), why
    assert not any(isinstance(f, FusedForward) for f in _fused(mxfp4))
    for fmt in ("int8", "int4", "int3", "int2"):  # verified on the H200: the default takes every kernel format
        low = swapmoe.load(olmoe_checkpoint, "12.5%", expert_dtype=fmt)
        layers = [(st.layer.experts, True) for st in low.swapmoe.layers]
        assert use_fused_kernel(layers, "auto", torch.device("cpu")) == []  # off CUDA: nothing changes
        assert not any(isinstance(f, FusedForward) for f in _fused(low))
        assert use_fused_kernel(layers, "auto", torch.device("cuda")) == []
        assert all(isinstance(f, FusedForward) and f.quantised.layout.fmt == fmt for f in _fused(low))
    monkeypatch.setattr(swapmoe.fused, "triton_available", lambda: False)
    with pytest.raises(MoEKernelError, match="needs Triton"):
        swapmoe.load(olmoe_checkpoint, "50%", moe_kernel="triton")


def _auto_on(model):
    """What ``auto`` installs on CUDA, made to run here: the layers swapmoe computes, on the CPU."""
    layers = [(st.layer.experts, st.pool is not None or st.layer.experts.__dict__.get("forward") is not None)
              for st in model.swapmoe.layers]
    for module, ours in layers:
        if ours:
            install(module, devices=("cpu",))
    return [f for f in _fused(model) if isinstance(f, FusedForward)]


@pytest.fixture(scope="module")
def gpt_oss_checkpoint(tmp_path_factory):
    from tests.tiny_models import make_checkpoint

    return make_checkpoint("gpt_oss", tmp_path_factory.mktemp("gpt_oss"), layout="fused")


@pytest.mark.parametrize(("family", "expert_dtype", "budget"),
                         [("olmoe", None, "50%"), ("olmoe", "int8", "25%"), ("olmoe", "int4", "12.5%"),
                          ("olmoe", "int3", "8%"), ("olmoe", "int2", "6.25%"), ("gpt_oss", None, "50%")])
# slots of 8: int8 at 25% all and 7, int4 at 12.5% 7 and 6, int3 at 8% 5 and 5, int2 at 6.25% 6 and 5. int3 on the
# tiny OLMoE (H=32, I=48: one group a row) reads gate_up as 32-bit words and down a byte at a time
def test_decode_with_the_fused_kernel_follows_the_unfused_path(kernels, request, family, expert_dtype, budget):
    """Half the experts resident, skip strategy (skipped terms reach the kernel), static decode with updates every
    token: the same tokens' logits with and without the fused kernel."""
    import swapmoe
    from swapmoe.engine.decoder import Decoder

    path = request.getfixturevalue(f"{family}_checkpoint")
    kw = {"strategy": "skip", "update_interval": 1, "expert_dtype": expert_dtype}
    plain = swapmoe.load(path, budget, **kw)
    fast = swapmoe.load(path, budget, **kw)
    fused = _auto_on(fast)
    assert len(fused) == len(fast.swapmoe.layers)
    if expert_dtype is not None:
        assert all(f.quantised is not None and f.quantised.layout.fmt == expert_dtype for f in fused)
    prompt = [(7 * i + 3) % 90 for i in range(MAX_TERMS // 2 + 8)]  # K=2: a prefill past MAX_TERMS terms
    feed = [11, 7, 29, 2, 60, 13, 4, 33]
    a, b = Decoder(plain, "static"), Decoder(fast, "static")
    la, lb = a.prefill(prompt, max_new_tokens=len(feed)), b.prefill(prompt, max_new_tokens=len(feed))
    torch.testing.assert_close(lb, la, rtol=0, atol=0)  # prefill: transformers' kernels in both
    assert sum(f.calls for f in fused) == 0
    worst = 0.0
    for tok in feed:
        la, lb = a.step(tok), b.step(tok)
        worst = max(worst, (lb - la).abs().max().item() / la.abs().max().item())
    assert 0 < worst < 1e-5  # float32 sums in another order (measured: 1.2-2.1e-7 of the largest logit)
    assert sum(f.calls for f in fused) == len(feed) * len(fused)
    assert fast.swapmoe.stats()["total"]["swaps"] == plain.swapmoe.stats()["total"]["swaps"] > 0


@pytest.mark.parametrize("policy", ["ondemand", "random-keep", "swapmoe-int8"])
def test_baselines_decode_the_same_through_the_fused_kernel(kernels, olmoe_checkpoint, policy, monkeypatch):
    """``auto`` is the default on CUDA, so every policy built on swapmoe's slots takes the kernel there:
    on-demand loading (which wraps the experts forward, the fused one inside, and copies missing experts
    into slots within the forward), a fixed random set, int8 swapmoe. Here ``auto`` is made to act on
    the CPU as it acts on CUDA, at load: the same logits as through transformers' kernels, swaps included."""
    import swapmoe.loader
    from swapmoe.baselines import load_policy
    from swapmoe.engine.decoder import Decoder

    installed = []

    def auto_here(layers, choice, device):
        installed.extend(install(m, devices=("cpu",)) for m, ours in layers if ours and choice == "auto")
        return []

    # int8: a quarter of the bytes holds half the experts; swaps within the 8 steps
    budget, kw = ("25%", {"update_interval": 1}) if policy == "swapmoe-int8" else ("50%", {})
    plain = load_policy(policy, olmoe_checkpoint, budget, moe_kernel="transformers", **kw)
    monkeypatch.setattr(swapmoe.loader, "use_fused_kernel", auto_here)
    fast = load_policy(policy, olmoe_checkpoint, budget, **kw)  # the default moe_kernel
    assert len(installed) == len(fast.swapmoe.layers)
    prompt, feed = [(5 * i + 1) % 90 for i in range(40)], [11, 7, 29, 2, 60, 13, 4, 33]  # 80-term prefill
    a, b = Decoder(plain, "dynamic"), Decoder(fast, "dynamic")
    a.prefill(prompt, max_new_tokens=len(feed))
    b.prefill(prompt, max_new_tokens=len(feed))
    assert sum(f.calls for f in installed) == 0  # a prefill keeps transformers' kernels
    for tok in feed:
        la, lb = a.step(tok), b.step(tok)
        torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)  # float32 sums in another order
    assert sum(f.calls for f in installed) >= len(feed) * len(installed)  # on-demand: a call per loaded group
    sa, sb = plain.swapmoe.stats()["total"], fast.swapmoe.stats()["total"]
    assert sa["swaps"] == sb["swaps"] and (policy == "random-keep" or sa["swaps"] > 0)


def test_a_compiled_decode_step_holds_the_fused_kernel_and_compiles_once(kernels, olmoe_checkpoint):
    """``compile_step`` with the fused kernel: one compile for the whole decode (a Python counter read while
    tracing made it recompile at every call; the H200 run compiled twice), the kernel inside the compiled
    step as its one operator, and the logits of the uncompiled fused steps while swaps flip the maps."""
    import swapmoe
    from swapmoe.engine.decoder import Decoder

    kw = {"strategy": "skip", "update_interval": 1}
    plain, fast = swapmoe.load(olmoe_checkpoint, "50%", **kw), swapmoe.load(olmoe_checkpoint, "50%", **kw)
    fused = _auto_on(fast)
    prompt, feed = [(7 * i + 3) % 90 for i in range(12)], [11, 7, 29, 2, 60, 13]
    a, b = Decoder(plain, "static"), Decoder(fast, "static", compile_step=True)
    a.prefill(prompt, max_new_tokens=len(feed))
    b.prefill(prompt, max_new_tokens=len(feed))
    eager_calls = sum(f.calls for f in fused)  # a 24-term prefill is decode-sized: eager, through the kernel
    for tok in feed:
        la, lb = a.step(tok), b.step(tok)
        torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)  # float32; inductor's fusions reorder sums
    assert b.compiled is not None and b.compiled.compiles == 1
    assert "swapmoe.fused_experts" in b.compiled.ops
    assert sum(f.calls for f in fused) == eager_calls  # every decode step ran compiled
    assert fast.swapmoe.stats()["total"]["swaps"] == plain.swapmoe.stats()["total"]["swaps"] > 0


# ------------------------------------------------------------ transformers' ExpertsInterface (opt-in)
@pytest.fixture
def registered():
    from transformers.integrations.moe import ExpertsInterface

    from swapmoe.fused import REGISTERED_NAME, register_experts_implementation

    assert REGISTERED_NAME not in ExpertsInterface._global_mapping  # nothing registers it at import
    yield register_experts_implementation()
    ExpertsInterface._global_mapping.pop(REGISTERED_NAME, None)


def test_registered_implementation_falls_back_to_grouped_mm_off_cuda(registered):
    """A plain transformers model can select it by name; a CPU call runs grouped_mm, bit for bit."""
    from tests.tiny_models import build_model

    ids = torch.tensor([[5, 17, 3, 42, 8]])
    model = build_model("olmoe")
    with torch.no_grad():
        want = model(ids).logits
        model.set_experts_implementation(registered)
        assert model.config._experts_implementation == registered
        assert torch.equal(model(ids).logits, want)
