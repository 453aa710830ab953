#!/bin/sh
# Goyal et al. Table 1 / Figure 1 in miniature on MNIST-1D (docs/studies.md): test error against kn from
# 64 to 16k under the linear scaling rule with gradual, constant and no warmup, 3 seeds, and the measured
# gradient noise scale.
# Usage: sh benchmarks/goyal_mnist1d/run.sh [WORKDIR]   (default runs/goyal_mnist1d; rerun to resume)
set -e
W=${1:-runs/goyal_mnist1d}
PY=${PYTHON:-python3}
mkdir -p "$W"
START=$(date +%s)
# 16,400 training signals (kn = 16,384 is one step per epoch), 3,600 test signals; n = 32 per worker as in
# the paper, k = 2 ... 512; 10 epochs, 2 of them warmup; the reference batch is the smallest (eta = 0.1 per
# 64 examples, the schema's 0.4 per 256), so warmup acts from kn = 128 on.
DATA="--override dataset=mnist1d:16400,3600 --override per_worker_batch_size=32 --override num_epochs=10"
REF="--override base_batch_size=64 --override base_learning_rate=0.1"
# 1. The gradient noise scale B_simple at kn = 256 (k = 8), averaged over training, 3 seeds.
$PY -m lbsgd.sweep --config=experiments/mnist1d.py --workdir="$W/noise" --seeds=0,1,2 $DATA $REF \
  --grid="num_workers=8;noise_scale=True"
# 2. kn = 64 ... 16,384: gradual warmup everywhere; constant and no warmup from kn = 1,024 on; kn = 2,048 and
#    4,096 with 4x the epochs (is it the number of steps that runs out, or the rule?).
$PY -m lbsgd.sweep --config=experiments/mnist1d.py --workdir="$W/kn" --seeds=0,1,2 $DATA $REF \
  --grid="num_workers=2,4,8,16,32,64,128,256,512;warmup=gradual" \
  --grid="num_workers=32,64,128,256,512;warmup=none,constant" \
  --grid="num_workers=64,128;num_epochs=40"
END=$(date +%s)
echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) this invocation: $((END - START)) s" >> "$W/wall_time.txt"
cat "$W/wall_time.txt"
