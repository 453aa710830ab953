"""Config glue: builds the optimizer and schedule of ``lbsgd.optim`` from a run's config object.

  * ``from_config``        -- ``(transform, schedule)`` for a config: ``goyal_schedule`` (Goyal et al.
                              2017 sections 2.1-2.2) driving ``goyal_sgd``, ``lars`` (You et al. 2017)
                              or plain ``momentum_sgd`` (eq. (10), Remark 2).
  * ``peak_learning_rate`` -- the rate after warmup for the config's kn examples under
                              ``config.lr_scaling`` (section 2.1, or McCandlish et al. 2018, eq. 2.6).

The only optim module that reads a config; it needs nothing but attribute access (``config.x``) and
supplies no defaults of its own: every field it reads is defined, with its default, in
``lbsgd.config.schema`` (start a config from ``lbsgd.config.schema.base_config()``). The pure pieces
(``scaling``, ``schedules``, ``transforms``) do not import it.
"""

from typing import Any, Tuple

import optax

from lbsgd.optim._choices import check_choice
from lbsgd.optim.scaling import scaled_learning_rate
from lbsgd.optim.schedules import DECAYS, WARMUPS, goyal_schedule
from lbsgd.optim.transforms import OPTIMIZERS, TRUST_RATIOS, goyal_sgd, lars, momentum_sgd


def _scaling_of(config: Any) -> Tuple[str, dict]:
    """``config.lr_scaling`` and the saturating rule's inputs, as keyword arguments."""
    return config.lr_scaling, dict(noise_scale=float(config.b_noise), max_learning_rate=float(config.lr_max))


def peak_learning_rate(config: Any) -> float:
    """The rate after warmup for ``config``'s k * n examples under ``config.lr_scaling``."""
    rule, kwargs = _scaling_of(config)
    global_batch_size = int(config.num_workers) * int(config.per_worker_batch_size)
    return scaled_learning_rate(
        rule, config.base_learning_rate, global_batch_size, config.base_batch_size, **kwargs
    )


def from_config(config: Any, steps_per_epoch: int) -> Tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds ``(transform, schedule)`` from a config with attribute access.

    Reads ``num_workers`` (k), ``per_worker_batch_size`` (n),
    ``base_learning_rate`` (eta per ``base_batch_size`` examples), ``warmup``,
    ``warmup_epochs``, ``decay``, ``decay_epochs``, ``decay_factor``,
    ``num_epochs``, ``optimizer`` (``'goyal_sgd'``, ``'lars'`` or ``'sgd'``;
    ``'sgd'`` is ``momentum_sgd`` without weight decay), ``momentum``,
    ``nesterov``, ``weight_decay``, ``momentum_correction``,
    ``trust_coefficient`` and ``lars_trust_ratio`` (``'optax'`` or
    ``'paper'``, see ``lars``), ``lr_scaling`` (``'linear'``, ``'sqrt'`` or
    ``'saturating'``; see ``scaled_learning_rate``), ``b_noise`` and
    ``lr_max`` (the saturating rule's B_noise and eta_max; 0 = derived, see
    there). ``lbsgd.config.schema`` defines each with its default.

    The global minibatch is always k * n (never read from the config); the
    schedule is ``goyal_schedule`` of it and is also what the transform uses.

    Raises:
      ValueError: unknown ``config.optimizer``, ``config.warmup``,
        ``config.decay`` or ``config.lars_trust_ratio``; the message names the
        field.
      AttributeError: a field is missing.
    """
    optimizer = config.optimizer
    check_choice("config.optimizer", optimizer, OPTIMIZERS)
    decay = config.decay
    check_choice("config.warmup", config.warmup, WARMUPS)
    check_choice("config.decay", decay, DECAYS)
    trust_ratio = config.lars_trust_ratio
    check_choice("config.lars_trust_ratio", trust_ratio, TRUST_RATIOS)
    global_batch_size = int(config.num_workers) * int(config.per_worker_batch_size)
    rule, scaling_kwargs = _scaling_of(config)
    schedule = goyal_schedule(
        config.base_learning_rate,
        global_batch_size,
        steps_per_epoch,
        base_batch_size=config.base_batch_size,
        warmup=config.warmup,
        warmup_epochs=config.warmup_epochs,
        decay=decay,
        decay_epochs=tuple(config.decay_epochs),
        decay_factor=config.decay_factor,
        num_epochs=config.num_epochs,
        scaling=rule,
        **scaling_kwargs,
    )

    momentum, nesterov = config.momentum, bool(config.nesterov)
    correction, weight_decay = bool(config.momentum_correction), config.weight_decay
    if optimizer == "goyal_sgd":
        tx = goyal_sgd(
            schedule,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            momentum_correction=correction,
        )
    elif optimizer == "lars":
        tx = lars(
            schedule,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=config.trust_coefficient,
            momentum_correction=correction,
            nesterov=nesterov,
            trust_ratio=trust_ratio,
        )
    else:
        tx = momentum_sgd(schedule, momentum, nesterov=nesterov, momentum_correction=correction)
    return tx, schedule
