r"""MNIST-1D (Greydanus 2020) on a 1-D ResNet: k=8 workers x n=16 on the paper's 4,000 / 1,000 split.

Command:
  python -m lbsgd.main --config=experiments/mnist1d.py --workdir=runs/mnist1d

The large split (60,000 / 10,000, generated and cached on first use, about 20 s):
  python -m lbsgd.main --config=experiments/mnist1d.py --workdir=runs/mnist1d_large --config.dataset=mnist1d_large

Hardware: any; the recorded runs (2-core CPU, one device) are in benchmarks/mnist1d_cpu_2026-12-04/.
Anchor: the paper's CNN reaches about 94 % on the 4,000 / 1,000 split; docs/mnist1d.md has what this reaches.

Everything else is the schema's default (lbsgd/config/schema.py), as for the digits: width 16, 20 epochs,
eta = 0.4 per 256 examples scaled linearly to 0.2 at kn = 128, 2 epochs of gradual warmup, cosine decay,
Nesterov momentum 0.9 with the momentum correction, weight decay 5e-4, a random shift by up to one
position ('shift'), per-worker BatchNorm, every strategy at its default options.
"""

from lbsgd.config import schema


def get_config():
    """Returns the MNIST-1D config: the schema's defaults with the dataset, the 1-D model and the signal length."""
    config = schema.base_config()
    config.dataset = "mnist1d"
    config.model = "resnet1d_8"
    config.image_size = 40  # the signal length
    return config
