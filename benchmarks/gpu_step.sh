#!/usr/bin/env bash
# ResNet-50 train-step throughput on one GPU (issue #12 targets: k=8 x n=32 with per-worker BN >= 6,500
# images/s; k=1 x n=32 >= 4,000), each setting under the XLA GPU options worth trying, one JSON each.
# Usage (from the repo root, on the GPU host): bash benchmarks/gpu_step.sh [OUTDIR]   (~10 min on an H100)
set -euo pipefail
out="${1:-benchmarks/gpu_$(date +%Y%m%d)}"
mkdir -p "$out"
py=${PYTHON:-python}
declare -A FLAGS=(
  [default]=""
  [cmdbuf]="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUDNN,CUSTOM_CALL,COLLECTIVES"
  [autotune4]="--xla_gpu_autotune_level=4"
  [latency_sched]="--xla_gpu_enable_latency_hiding_scheduler=true"
)
for name in default cmdbuf autotune4 latency_sched; do
  for setting in "8 32" "1 32" "1 256"; do
    set -- $setting
    XLA_FLAGS="${FLAGS[$name]}" "$py" -m lbsgd.bench step --model resnet50 --dtype bfloat16 \
      --num_workers "$1" --per_worker_batch_size "$2" --repeats 30 --warmup 5 \
      --json "$out/step_k$1_n$2_${name}.json" | tail -4
  done
done
# the input pipeline on this host must outrun the step: images/s per core x cores vs the step's images/s
"$py" -m lbsgd.bench input --json "$out/input.json" | tail -3
