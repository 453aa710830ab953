r"""Default experiment: k=8 workers x n=16 digits on a small ResNet (the README's first command).

Command:
  python -m lbsgd.main --config=experiments/digits.py --workdir=runs/digits

Hardware: any; the recorded runs (2-core CPU, one device) are in benchmarks/digits_cpu_2026-12-04.json.
Expected: >= 98.5 % test accuracy on the 360 held-out scikit-learn digits.
Override anything from the command line, e.g. --config.num_workers=16 --config.num_epochs=10.

The digits run is the schema's default (lbsgd/config/schema.py, experiments/base.py): ResNet-8 of width
16, 20 epochs, eta = 0.4 per 256 examples scaled linearly to 0.2 at kn = 128, 2 epochs of gradual
warmup, cosine decay, Nesterov momentum 0.9 with the momentum correction, weight decay 5e-4, one-pixel
shift augmentation, every strategy at its default options.
"""

from lbsgd.config import schema


def get_config():
    """Returns the digits config: every field at its default."""
    return schema.base_config()
