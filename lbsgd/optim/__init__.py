"""Large-minibatch SGD as in Goyal et al. 2017, as optax transforms.

"Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", arXiv:1706.02677.
Notation follows the paper: k workers, n examples per worker, global minibatch
kn, reference rate eta for a minibatch of 256.

``lbsgd.optim.scaling``:
  * ``linear_scaling``  -- Linear Scaling Rule (section 2.1).
  * ``sqrt_scaling``, ``saturating_scaling``, ``scaled_learning_rate`` --
                           the square-root rule, and a rule that levels off
                           at eta_max beyond the gradient noise scale
                           (McCandlish et al. 2018, eq. 2.6).

``lbsgd.optim.schedules``:
  * ``goyal_schedule``  -- gradual / constant warmup (section 2.2), then step
                           or cosine decay.

``lbsgd.optim.transforms``:
  * ``momentum_sgd``    -- momentum SGD in the eq. (10) form with the
                           momentum correction of Remark 2.
  * ``goyal_sgd``       -- L2 weight decay as a separate gradient term
                           (Remark 1), no decay on BN gamma/beta or biases
                           (``weight_decay_mask``), then ``momentum_sgd``.
  * ``lars``            -- LARS (You et al. 2017) on top of ``momentum_sgd``,
                           with optax's or the paper's trust ratio
                           (``scale_by_paper_trust_ratio``).

``lbsgd.optim.factory``:
  * ``from_config``     -- builds (transform, schedule) from a config object.
  * ``peak_learning_rate`` -- the rate after warmup for a config's kn examples.

The pure pieces (``scaling``, ``schedules``, ``transforms``) need only jax and
optax: ``lbsgd.optim`` without ``factory`` has no other lbsgd dependency.
``factory`` is the only module here that reads a config object.
"""

from lbsgd.optim.factory import from_config, peak_learning_rate
from lbsgd.optim.scaling import LR_SCALINGS, linear_scaling, saturating_scaling, scaled_learning_rate, sqrt_scaling
from lbsgd.optim.schedules import DECAYS, WARMUPS, goyal_schedule
from lbsgd.optim.transforms import (
    OPTIMIZERS,
    TRUST_RATIOS,
    MaskOrFn,
    MomentumSGDState,
    ScalarOrSchedule,
    goyal_sgd,
    lars,
    momentum_sgd,
    scale_by_paper_trust_ratio,
    weight_decay_mask,
)

__all__ = [
    "DECAYS",
    "LR_SCALINGS",
    "OPTIMIZERS",
    "TRUST_RATIOS",
    "WARMUPS",
    "MaskOrFn",
    "MomentumSGDState",
    "ScalarOrSchedule",
    "from_config",
    "goyal_schedule",
    "goyal_sgd",
    "lars",
    "linear_scaling",
    "momentum_sgd",
    "peak_learning_rate",
    "saturating_scaling",
    "scale_by_paper_trust_ratio",
    "scaled_learning_rate",
    "sqrt_scaling",
    "weight_decay_mask",
]
