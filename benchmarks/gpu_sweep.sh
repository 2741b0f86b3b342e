#!/usr/bin/env bash
# The policy sweep on an OLMoE-1B-7B-sized model with random weights, for latency and memory only
# (random weights carry no accuracy signal, so the full-model reference is skipped). Run on the GPU
# machine from the repository root:  bash benchmarks/gpu_sweep.sh OUT_DIR
set -euo pipefail
out=${1:-runs/gpu-sweep}
model=/tmp/swapmoe-bench-olmoe-1b-7b
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python benchmarks/budgets.py --arch olmoe-1b-7b --model-dir "$model" --build-only
# any tokenizer will do for speed: the token ids only have to be below the vocabulary size
cp models/ref-moe/tokenizer.json models/ref-moe/tokenizer_config.json "$model"/
python -m swapmoe.cli sweep "$model" --text data/heldout/all.txt --max-tokens 1024 --window 256 \
  --decode-tokens 64 --no-reference --dtype bfloat16 --budgets "${BUDGETS:-25%,50%}" \
  --policies "${POLICIES:-full,swapmoe,swapmoe-skip,ondemand,magnitude-keep,accelerate-offload}" --out "$out"
