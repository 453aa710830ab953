#!/bin/sh
# Jin et al. 2016 Figures 1-2 in miniature on MNIST-1D (docs/studies.md): test error against epochs and
# against modelled time for the synchronous, decentralized, asynchronous and local-update strategies at
# p = 8, 16 (kn = 256) and p = 32, 64, 128 (n = 16), each tuned on a validation split, on 10 GbE and
# InfiniBand, with stragglers of CV 0, 0.1 and 0.5.
# Usage: sh benchmarks/jin_mnist1d/run.sh [WORKDIR]   (default runs/jin_mnist1d; rerun to resume)
set -e
W=${1:-runs/jin_mnist1d}
PY=${PYTHON:-python3}
mkdir -p "$W"
START=$(date +%s)
# 16,400 training signals, 3,600 test; 4 epochs (1 of warmup). Tuning: learning-rate multiplier 1 or 1/8
# and momentum 0.9 or 0.5, on 20 % of the training split held out; then seed 0 on the whole training split.
# Time model: one worker's compute is ResNet-50's on one H200 (9.5 ms for n = 32, measured in
# benchmarks/gpu-h200-2026-12-04/k1n32_peer.json; half of it for n = 16), the same for every strategy.
COMMON="--config=experiments/mnist1d.py --override dataset=mnist1d:16400,3600 --num_epochs=4
  --override warmup_epochs=1 --tune --tune_grid=lr=0.125,1;momentum=0.9,0.5 --seeds=0
  --straggler_cv=0,0.1,0.5 --target_error=10"
STRATEGIES="allreduce,easgd tau=1,easgd tau=10,gossip pull,gossip push,dpsgd ring,async_ps tau=k-1,local_sgd H=4"
P8="--workers=8 --override per_worker_batch_size=32 --cpu_devices=8 --compute_ms=9.5"
P16="--workers=16,32,64,128 --cpu_devices=16 --compute_ms=4.75"
SIM="--strategies=async_ps tau=k-1"
# p = 8 at n = 32 (kn = 256), one worker per simulated device.
$PY -m lbsgd.compare $COMMON $P8 --workdir="$W/p8" --strategies="$STRATEGIES"
# p = 16, 32, 64, 128 at n = 16 (kn = 256 ... 2,048), 1 to 8 workers per simulated device. Local SGD at
# p = 128 first, on 32 simulated devices: on 16, XLA:CPU crashed at random steps (a segmentation fault).
# A run's result does not depend on the layout, so the second call reuses these runs.
$PY -m lbsgd.compare $COMMON $P16 --workdir="$W/p16-128" --strategies="local_sgd H=4" --workers=128 --cpu_devices=32
$PY -m lbsgd.compare $COMMON $P16 --workdir="$W/p16-128" --strategies="$STRATEGIES"
# The parameter server whose pulls (hence staleness) follow simulated worker times with CV 0.5.
PS="--override async_ps.delay=simulated --override async_ps.straggler_cv=0.5"
$PY -m lbsgd.compare $COMMON $P8 --workdir="$W/ps_sim_p8" "$SIM" $PS
$PY -m lbsgd.compare $COMMON $P16 --workdir="$W/ps_sim_p16-128" "$SIM" $PS
# One summary of the comparisons: time to 10, 5, 25 and 50 % test error, the fastest strategy per p.
$PY benchmarks/jin_mnist1d/summarize.py "$W" --targets=10,5,25,50
END=$(date +%s)
echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) this invocation: $((END - START)) s" >> "$W/wall_time.txt"
cat "$W/wall_time.txt"
