#!/bin/sh
# The digits sweep of docs/comparison.md: measure the gradient noise scale, then the kn sweep.
# Usage: sh benchmarks/sweep/run.sh [WORKDIR]   (default runs/sweep; rerun to resume)
set -e
W=${1:-runs/sweep}
PY=${PYTHON:-python3}
# Goyal's reference batch is the smallest one here (n = 16 = kn at k = 1): eta = 0.025 per 16 examples is
# the default 0.4 per 256, so warmup acts from kn = 32 on.
REF="--override base_batch_size=16 --override base_learning_rate=0.025"
# 1. The noise scale B_simple of the default run (k = 8 x n = 16), averaged over its training, 3 seeds.
$PY -m lbsgd.sweep --config=experiments/digits.py --workdir="$W/noise" --seeds=0,1,2 $REF --grid="noise_scale=True"
B=$($PY -c "import csv,sys; r=list(csv.DictReader(open(sys.argv[1]))); print(round(sum(float(x['noise_scale_run']) for x in r)/len(r)))" "$W/noise/sweep.csv")
echo "measured B_noise = $B examples"
# 2. kn = 16 ... 1024 through k = 1 ... 64 at n = 16: warmup kinds, the saturating rule with B_noise, LARS
#    at the largest kn (its default rate and 10x, 100x: LARS scales each layer's step by 0.001 |w|/|g|),
#    and the two largest kn with 4x the epochs (is it the number of steps that runs out?).
$PY -m lbsgd.sweep --config=experiments/digits.py --workdir="$W" --seeds=0,1,2 $REF \
  --grid="num_workers=1,2,4,8,16,32,64;warmup=gradual" \
  --grid="num_workers=2,4,8,16,32,64;warmup=none,constant" \
  --grid="num_workers=1,2,4,8,16,32,64;lr_scaling=saturating;b_noise=$B" \
  --grid="num_workers=64;optimizer=lars" \
  --grid="num_workers=64;optimizer=lars;base_learning_rate=0.25,2.5" \
  --grid="num_workers=32,64;num_epochs=80"
