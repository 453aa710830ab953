r"""Goyal et al. 2017 baseline: ResNet-50 on ImageNet, k=8 workers x n=32 = 256 images per step.

Command (one host with 8 accelerators; ImageNet prepared for TFDS, see docs/imagenet.md):
  python -m lbsgd.main --config=experiments/imagenet_256.py --workdir=runs/imagenet_256

Hardware assumed: one server with 8 GPUs (the paper: 8 NVIDIA P100, "Big Basin"), or any 8 devices;
k must be a multiple of the device count. Data: `imagenet2012` (1,281,167 train / 50,000 val images)
in array_record format under $TFDS_DATA_DIR or --config.data_dir.
Expected (paper, Table 1/2a, kn=256): 23.60 ± 0.12 % top-1 error (mean ± std of 5 runs) after 90 epochs
(450,360 steps); about 29 hours on the 8 P100s, far less on current GPUs/TPUs.

The recipe (Goyal §5.1): ResNet-50 v1.5 (stride on the 3x3), zero-γ init of each residual block's
last BN, BN momentum 0.9 with statistics over each worker's n=32 examples (lbsgd.models.resnet);
90 epochs; η = 0.1 per 256 images scaled linearly to kn·0.1/256 (§2.1); gradual warmup over 5
epochs from η to kη when kn > 256 (§2.2); step decay x0.1 at epochs 30, 60, 80; Nesterov momentum
0.9 with the momentum correction (Remark 2); weight decay 1e-4 added to the gradient (Remark 1),
not on BN γ/β or biases; no label smoothing; random-size crop + flip for training, 256 -> 224
center crop for evaluation. Compute in bfloat16 with float32 parameters, optimizer state and BN
statistics (--config.dtype=float32 for the paper's all-float32 arithmetic).

The rest of the paper's experiments are command-line overrides of this file or of
experiments/imagenet_8k.py (n = 32 throughout; the global batch kn = k·32 is derived):
  Fig. 1 / Fig. 5, kn = 128 ... 65,536:     --config.num_workers=4 | 8 | 16 | ... | 2048
  Table 1, warmup at kn = 8k:               --config.warmup=none | constant | gradual
  Table 2a, learning-rate rules at kn = 8k: --config.base_learning_rate=0.05 | 0.1 | 0.2   (η·32)
                                            --config.base_learning_rate=0.003125           (0.1, unscaled)
                                            --config.base_learning_rate=0.0176777          (0.1·sqrt(32))
  Table 2a at kn = 256:                     --config.base_learning_rate=0.05 | 0.1 | 0.2
  ResNet-101 instead of ResNet-50:          --config.model=resnet101
(base_learning_rate is the rate per 256 images; the step size is base_learning_rate·kn/256.)
"""

from lbsgd.config import schema


def get_config():
    """Returns the kn=256 ImageNet config (Goyal et al. baseline): the base config with what differs."""
    c = schema.base_config()
    # Data.
    c.dataset = "imagenet2012"  # or 'folder:<path>' for your own train/<class>/*.jpg, val/<class>/*.jpg
    c.augment = "inception"  # random-size crop + flip; center crop for evaluation
    c.image_size = 224
    # Workers: k = 8 (the base) x n = 32.
    c.per_worker_batch_size = 32
    # A device runs its k/d workers in the fewest sequential microsteps of <= 256 images each (0 = automatic):
    # one microstep on the paper's hardware, more when a sweep puts many workers on few devices. The
    # numbers do not change (each worker's 32 images stay together). Lower it on small-memory devices.
    c.accumulation_steps = 0
    c.max_device_batch = 256
    # Model: ResNet-50 v1.5, zero-gamma, BN momentum 0.9 (built into lbsgd.models.resnet).
    c.model = "resnet50"
    c.model_width = 64
    c.dtype = "bfloat16"  # compute dtype; params, optimizer state and BN statistics stay float32
    # Optimizer (Goyal §5.1): eta = 0.1 per 256 images, 5 warmup epochs, x0.1 at epochs 30, 60, 80.
    c.base_learning_rate = 0.1
    c.warmup_epochs = 5
    c.decay = "step"
    c.decay_epochs = (30, 60, 80)
    c.weight_decay = 1e-4  # not on BN gamma/beta or biases
    c.num_epochs = 90
    # Bookkeeping.
    c.eval_batch_size = 1024  # images per eval step over all devices; every val image is seen once
    c.log_every_steps = 500
    c.eval_every_epochs = 1
    c.checkpoint_every_steps = 5000  # about one epoch at kn=256
    return c
