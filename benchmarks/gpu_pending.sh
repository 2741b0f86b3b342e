#!/usr/bin/env bash
# The GPU checks, as one stage per device call (each stays under the device tool's 10-minute limit;
# results land under $OUT). Run on the H200 on 2026-12-01 (docs/results/): tests, tf524, kernels, olmoe,
# qwen3, int4's benchmark, and quantised decode rows. Not yet run: lowbit, lowbit-decode, accelerate, quantcuda.
#
#   bash benchmarks/gpu_pending.sh tests      # CUDA tests: graph path, quantised graphs, fused kernel, MXFP4, compiled step
#   bash benchmarks/gpu_pending.sh tf524      # the same CUDA tests that need transformers >= 5.21 (gpt-oss graph capture);
#                                             # carry the wheel: pip download transformers==5.24.0 --no-deps -d .gpu-wheels
#   bash benchmarks/gpu_pending.sh kernels    # fused Triton MoE kernel vs grouped_mm per layer (benchmarks/fused_moe.py)
#   bash benchmarks/gpu_pending.sh olmoe      # decode: every baseline and the compiled step with the fused kernel, in one run
#   bash benchmarks/gpu_pending.sh qwen3      # decode on the Qwen3-30B-A3B shape (12 layers) with the fused kernel and compiled step
#   bash benchmarks/gpu_pending.sh int4       # int4, int3, int2 in the fused kernel: their CUDA tests, then int4 per layer
#                                             # against the gather path
#   bash benchmarks/gpu_pending.sh int4-decode  # decode with int4 slots, fused kernel vs per-term path, beside bf16 and int8
#   bash benchmarks/gpu_pending.sh lowbit     # int3 and int2 in the fused kernel per layer against the gather path
#   bash benchmarks/gpu_pending.sh lowbit-decode  # decode with int3 and int2 slots, fused kernel vs per-term path
#   bash benchmarks/gpu_pending.sh quantized  # decode: quantized-all at 25% and 50% beside swapmoe at the same bytes
#   bash benchmarks/gpu_pending.sh accelerate # decode: the accelerate-offload baseline (a few tokens) beside swapmoe 50%
#   bash benchmarks/gpu_pending.sh quantcuda  # quantising on the GPU against the CPU, the chunked prefill on the GPU
#
# Each stage writes a log and, for the benchmarks, a JSON with provenance under $OUT/<stage>/.
set -uo pipefail
stage=${1:?"stage: tests | tf524 | kernels | olmoe | qwen3 | int4 | int4-decode | lowbit | lowbit-decode | quantized | accelerate | quantcuda"}
out=${OUT:-runs/gpu}/$stage
mkdir -p "$out"
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
cuda_tests=(tests/test_cuda.py tests/test_fused_moe_cuda.py tests/test_mxfp4_cuda.py)
# pytest with a time limit: the log under $out, its outcome lines on stdout
cuda_pytest() {
  local limit=$1; shift
  timeout "$limit" python3 -m pytest -q -rA -p no:cacheprovider -p no:logging "$@" >"$out/pytest.txt" 2>&1
  grep -E "passed|failed|^FAILED|^ERROR|XPASS|^E  " "$out/pytest.txt" | tail -40
}
# a benchmark script with a time limit, its JSON under $out
bench() {
  local limit=$1 script=$2; shift 2
  timeout "$limit" python3 "benchmarks/$script" "$@" --out "$out" 2>&1 | grep -v "Loading\|Writing" | tail -60
}
olmoe=(--arch olmoe-1b-7b --tokens 24 --rounds 4 --profile-tokens 8)
case $stage in
  tests)
    cuda_pytest 540 "${cuda_tests[@]}" ;;
  tf524)
    wheel=$(ls .gpu-wheels/transformers-5.2[1-9]*.whl 2>/dev/null | head -1)
    [ -n "$wheel" ] || { echo "carry a transformers >= 5.21 wheel in .gpu-wheels/"; exit 2; }
    python3 -m pip install -q --no-deps --target /tmp/tf-new "$wheel"
    PYTHONPATH=/tmp/tf-new:$PYTHONPATH cuda_pytest 540 "${cuda_tests[@]}" -k "sliding_window or mxfp4 or gpt_oss or full_budget" ;;
  kernels)
    bench 540 fused_moe.py --no-sweep ;;
  olmoe)
    # the whole comparison in one run with the defaults (fused kernel) and the compiled step (checks one compile)
    bench 560 decode.py "${olmoe[@]}" --compile-step \
      --settings "plain transformers, eager;plain transformers, graph;plain transformers, graph+compiled;swapmoe 100%, graph+compiled;swapmoe 50%, graph;swapmoe 50%, graph+compiled;ondemand 50%" ;;
  qwen3)
    bench 560 decode.py --arch qwen3-30b-a3b --layers 12 --tokens 16 --rounds 3 --profile-tokens 6 --compile-step \
      --settings "plain transformers, eager;plain transformers, graph;swapmoe 100%, graph;swapmoe 50%, graph;swapmoe 50%, graph+compiled;swapmoe int8, slots of 50%, graph;ondemand 50%" ;;
  int4)
    cuda_pytest 240 "${cuda_tests[@]}" -k "int4 or int3 or int2"
    bench 330 fused_moe.py --no-sweep --no-int3 --no-int2 --shapes olmoe-1b-7b,qwen3-30b-a3b ;;
  int4-decode)
    bench 560 decode.py "${olmoe[@]}" --moe-kernel transformers,triton \
      --settings "swapmoe 50%, graph;swapmoe int8, slots of 50%, graph;swapmoe int4, slots of 50%, graph" ;;
  lowbit)
    bench 560 fused_moe.py --no-sweep --no-int8 --no-int4 --shapes olmoe-1b-7b,qwen3-30b-a3b ;;
  lowbit-decode)
    bench 560 decode.py "${olmoe[@]}" --moe-kernel transformers,triton \
      --settings "swapmoe int3, slots of 50%, graph;swapmoe int2, slots of 50%, graph" ;;
  quantized)
    # issue 14: quantized-all (every expert resident in the least lossy format that fits) beside swapmoe at the
    # same bytes, with the defaults (the fused kernel for every packed format)
    bench 560 decode.py "${olmoe[@]}" \
      --settings "swapmoe 25%, graph;swapmoe 25% int4, graph;quantized-all 25%, graph;quantized-all 50%, graph" ;;
  accelerate)
    bench 560 decode.py "${olmoe[@]}" --rounds 2 \
      --settings "plain transformers, graph;swapmoe 50%, graph;accelerate offload 50%" ;;
  quantcuda)  # the CPU side of test_quant_cuda quantises int3/int2 on the host: minutes, hence the limit
    cuda_pytest 540 tests/test_quant_cuda.py tests/test_qexperts.py -k "cuda or gpu" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
