"""Learning-rate scaling rules: the peak rate for a global minibatch of kn examples.

  * ``linear_scaling``      -- Goyal et al. 2017's Linear Scaling Rule (section 2.1).
  * ``sqrt_scaling``        -- the square-root rule (Krizhevsky 2014; Hoffer et al. 2017).
  * ``saturating_scaling``  -- eta_max / (1 + B_noise / B) (McCandlish et al. 2018, eq. 2.6).
  * ``scaled_learning_rate`` -- one of the three by name (``LR_SCALINGS``).

Pure: depends only on the standard library.
"""

from lbsgd.optim._choices import check_choice

LR_SCALINGS = ("linear", "sqrt", "saturating")


def linear_scaling(base_learning_rate: float, global_batch_size: int, base_batch_size: int = 256) -> float:
    """Linear Scaling Rule (Goyal et al. section 2.1).

    "When the minibatch size is multiplied by k, multiply the learning rate by
    k": a rate ``base_learning_rate`` (eta) tuned for ``base_batch_size``
    examples becomes ``eta * kn / base_batch_size`` for a global minibatch of
    kn = ``global_batch_size`` examples. With the paper's reference of 256,
    eta = 0.1 and kn = 8192 give 3.2.
    """
    return float(base_learning_rate) * float(global_batch_size) / float(base_batch_size)


def sqrt_scaling(base_learning_rate: float, global_batch_size: int, base_batch_size: int = 256) -> float:
    """Square-root scaling: ``eta * sqrt(kn / base_batch_size)`` (Krizhevsky 2014; Hoffer et al. 2017),
    the rule that keeps the variance of the update constant as the batch grows."""
    return float(base_learning_rate) * (float(global_batch_size) / float(base_batch_size)) ** 0.5


def saturating_scaling(max_learning_rate: float, noise_scale: float, global_batch_size: int) -> float:
    """A rule that saturates: ``eta_max / (1 + B_noise / B)`` for a global minibatch of B = kn examples.

    McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", eq. 2.6): the best step size of
    SGD on a batch of B examples is about eta_max / (1 + B_noise / B), where eta_max is the best step of
    full-batch gradient descent (at most 1/L on an L-smooth loss) and B_noise, the gradient noise scale
    (B_simple = tr(Sigma) / |G|^2), is where averaging more examples stops paying. For B << B_noise it
    grows linearly, eta_max * B / B_noise (the Linear Scaling Rule's regime); for B >> B_noise it levels
    off at eta_max. Same shape as the step 1 / (L + sqrt(K sigma^2 / M)) that the analysis of
    (asynchronous) parallel SGD allows, which grows with the batch M until it reaches 1 / L.
    """
    if not noise_scale > 0 or not max_learning_rate > 0:
        raise ValueError(
            f"saturating scaling needs noise_scale > 0 and max_learning_rate > 0, got {noise_scale!r}, {max_learning_rate!r}"
        )
    return float(max_learning_rate) / (1.0 + float(noise_scale) / float(global_batch_size))


def scaled_learning_rate(
    rule: str,
    base_learning_rate: float,
    global_batch_size: int,
    base_batch_size: int = 256,
    *,
    noise_scale: float = 0.0,
    max_learning_rate: float = 0.0,
) -> float:
    """The peak learning rate for a global minibatch of kn = ``global_batch_size`` under ``rule``.

    * ``'linear'``: ``linear_scaling`` (Goyal et al. section 2.1, the default);
    * ``'sqrt'``: ``sqrt_scaling``;
    * ``'saturating'``: ``saturating_scaling(max_learning_rate, noise_scale, kn)``. ``noise_scale``
      (B_noise, e.g. ``results.json``'s ``noise_scale`` of a short run with ``config.noise_scale``) is
      required; ``max_learning_rate`` = 0 takes eta_max = ``linear_scaling(eta, B_noise)``, the eta_max
      for which the rule agrees with the linear one at small batches (eta * B / base for B << B_noise)
      and levels off at the linear rule's rate for B_noise.

    Raises:
      ValueError: an unknown ``rule``, or ``'saturating'`` without a positive ``noise_scale``.
    """
    check_choice("lr_scaling", rule, LR_SCALINGS)
    if rule == "linear":
        return linear_scaling(base_learning_rate, global_batch_size, base_batch_size)
    if rule == "sqrt":
        return sqrt_scaling(base_learning_rate, global_batch_size, base_batch_size)
    if not noise_scale > 0:
        raise ValueError(f"lr_scaling='saturating' needs a gradient noise scale B_noise > 0, got {noise_scale!r}")
    eta_max = max_learning_rate or linear_scaling(base_learning_rate, noise_scale, base_batch_size)
    return saturating_scaling(eta_max, noise_scale, global_batch_size)
