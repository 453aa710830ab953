r"""Goyal et al. 2017 headline run: ResNet-50 on ImageNet, k=256 workers x n=32 = 8,192 images per step.

Command, one process per host (32 hosts x 8 GPUs; see docs/imagenet.md for SLURM/TPU):
  python -m lbsgd.main --config=experiments/imagenet_8k.py --workdir=/shared/runs/imagenet_8k \
    --coordinator_address=HOST0:1234 --num_processes=32 --process_id=$RANK

Hardware assumed: 256 accelerators (the paper: 32 servers x 8 NVIDIA P100, 50 Gbit Ethernet), or
any device count dividing 256 (fewer devices run several workers each; per-worker BN is unchanged).
Expected (paper, Table 1/2a, kn=8k): 23.74 ± 0.09 % top-1 error (mean ± std of 5 runs), against
23.60 ± 0.12 % at kn=256; 90 epochs = 14,040 steps of 156 per epoch (1,281,167 // 8,192, the partial
last batch dropped) in about 1 hour on the 256 P100s.

Everything but k comes from experiments/imagenet_256.py (one source of truth): η = 0.1·8192/256 = 3.2,
gradual warmup from 0.1 to 3.2 over 5 epochs (780 steps), then x0.1 at epochs 30/60/80 (steps 4,680,
9,360, 12,480). The sweep overrides listed there apply here too, e.g. kn = 65,536:
  --config.num_workers=2048
"""

import importlib.util
import os


def _baseline():
    """Load the sibling imagenet_256.py by path (works whatever the working directory)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_256.py")
    spec = importlib.util.spec_from_file_location("lbsgd_experiments_imagenet_256", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
    """Returns the kn=8k ImageNet config: the kn=256 config with k=256 workers."""
    c = _baseline().get_config()
    c.num_workers = 256
    c.eval_batch_size = 8192
    c.log_every_steps = 20
    c.checkpoint_every_steps = 156  # one epoch at kn=8k
    return c
