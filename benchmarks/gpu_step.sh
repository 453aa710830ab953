#!/usr/bin/env bash
# ResNet-50 bf16 train-step throughput on one GPU, sized to fit one 10-minute call: lbsgd's step at
# k = 1 x n = 256, 1 x 32 and 8 x 32 (per-worker BN), with the Flax ImageNet example's step beside it in the
# same process where FLAX_DIR names its folder (google/flax's examples/imagenet, carried to the host), and
# with the step's options on and off: --steps_per_dispatch=4 (a device loop of 4 steps a call) and
# --model_stem=space_to_depth (the 7x7/2 stem as a 4x4/1 convolution on a 2x2 space-to-depth input).
#
#   bash benchmarks/gpu_step.sh OUTDIR        (from the repo root, on the GPU host)
#
# The settings run most important first, each under `timeout`; none starts after BUDGET_S seconds
# (default 450), so the script returns with what it has measured. Each writes
# OUTDIR/step_k<K>_n<N>_<name>.json; everything printed goes to OUTDIR/log.txt. The first setting also
# profiles one window of steps (OUTDIR/profile; its top ops are printed and in its JSON). `bench input`
# runs only where TensorFlow is installed. docs/performance.md has the whole device call.
#
# Wheels: `bench step` builds its step from a run config (lbsgd.config.schema), so it needs ml_collections.
# A GPU image with jax, flax, optax and orbax but without ml_collections needs its wheel in .whl/ (not in
# the repo; fetch it with `python3 -m pip download --no-deps --only-binary=:all: -d .whl ml-collections`).
# Its own dependencies, absl-py and PyYAML, come with optax/orbax and flax. Every wheel in .whl/ is
# installed into /tmp/site first; without ml_collections the script stops before any setting runs.
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu_step.sh OUTDIR}"
py="${PYTHON:-python3}"
budget="${BUDGET_S:-450}"
model="${MODEL:-resnet50}" # MODEL=resnet4: a quick check of the script itself, on any host
if compgen -G "$out/step_*.json" >/dev/null; then
  echo "gpu_step.sh: $out already holds results; name a new OUTDIR" >&2
  exit 2
fi
mkdir -p "$out"
log="$out/log.txt"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$py" -c 'import sys, jax; print("python", sys.version.split()[0], "jax", jax.__version__, jax.devices())' 2>&1 | tee "$log"
if ! "$py" -c 'import ml_collections' 2>/dev/null; then
  echo "gpu_step.sh: ml_collections is not importable; put its wheel (ml_collections-*.whl) in .whl/" | tee -a "$log" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$log"

declare -A FLAGS=(
  [default]=""
  [sync]=""
  [cmdbuf]="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUDNN,CUSTOM_CALL,COLLECTIVES"
  [autotune4]="--xla_gpu_autotune_level=4"
  [spd4]=""
  [s2d]=""
  [both]=""
)
peer=()
if [[ -n "${FLAX_DIR:-}" ]]; then
  peer=(--peer=flax "--flax_dir=$FLAX_DIR")
fi

step() { # step NAME K N [more bench step flags]
  local name=$1 k=$2 n=$3
  shift 3
  if ((SECONDS > budget)); then
    echo "== skipped $name k=$k n=$n: past $budget s" | tee -a "$log"
    return
  fi
  echo "== $name k=$k n=$n (at $SECONDS s) XLA_FLAGS=${FLAGS[$name]}" | tee -a "$log"
  XLA_FLAGS="${FLAGS[$name]}" timeout 240 "$py" -m lbsgd.bench step --model "$model" --dtype bfloat16 \
    --num_workers "$k" --per_worker_batch_size "$n" --repeats 20 --warmup 2 "$@" \
    --json "$out/step_k${k}_n${n}_${name}.json" 2>&1 | tee -a "$log"
}

step default 1 256 "${peer[@]}"
step default 1 32 "${peer[@]}"
step default 8 32 --profile "$out/profile" # 8 workers' BN on one GPU
step both 1 256 --steps_per_dispatch=4 --model_stem=space_to_depth "${peer[@]}"
step both 1 32 --steps_per_dispatch=4 --model_stem=space_to_depth "${peer[@]}"
step both 8 32 --steps_per_dispatch=4 --model_stem=space_to_depth
step spd4 8 32 --steps_per_dispatch=4
step s2d 8 32 --model_stem=space_to_depth
step cmdbuf 8 32
step autotune4 8 32
step sync 8 32 --in_flight=1 # what waiting on every step costs (the default keeps 4 in flight)
step cmdbuf 1 32
step autotune4 1 32

# The input pipeline on this host must outrun the step: images/s per core x cores vs the step's images/s.
if "$py" -c 'import tensorflow' 2>/dev/null; then
  "$py" -m lbsgd.bench input --json "$out/input.json" 2>&1 | tail -3 | tee -a "$log"
else
  echo "== bench input skipped: no TensorFlow on this host" | tee -a "$log"
fi
echo "== done at $SECONDS s" | tee -a "$log"
"$py" - "$out" <<'PY' | tee -a "$log"
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "step_*.json"))):
    r = json.load(open(path))
    print(f"{os.path.basename(path):32s} {r['images_per_second']:9.1f} images/s  step {1e3 * r['step_time_median_s']:7.2f} ms"
          f"  MFU {100 * r['mfu']:5.1f} %  {r.get('in_flight')} in flight  {r['device_kind']}"
          + (f"  flax {r['flax_images_per_second']:9.1f} ratio {r['ratio_lbsgd_to_flax']:.3f}" if 'flax_images_per_second' in r else ""))
PY
