"""The per-iteration learning rate of Goyal et al. 2017: warmup, then decay.

  * ``goyal_schedule`` -- gradual / constant warmup (section 2.2) to the peak rate of a scaling rule
                          (``lbsgd.optim.scaling``; the Linear Scaling Rule of section 2.1 by default),
                          then step or cosine decay; an ``optax.Schedule``.

Pure: depends only on jax and optax.
"""

from typing import Sequence

import jax.numpy as jnp
import optax

from lbsgd.optim._choices import check_choice
from lbsgd.optim.scaling import scaled_learning_rate

WARMUPS = ("gradual", "constant", "none")
DECAYS = ("step", "cosine", "none")


def _epoch_to_step(epochs: float, steps_per_epoch: int) -> int:
    """First iteration at or after ``epochs`` epochs (ceil, robust to float noise)."""
    x = round(float(epochs) * steps_per_epoch, 6)
    n = int(x)
    return n if n == x else n + 1


def goyal_schedule(
    base_learning_rate: float,
    global_batch_size: int,
    steps_per_epoch: int,
    *,
    base_batch_size: int = 256,
    warmup: str = "gradual",
    warmup_epochs: float = 5,
    decay: str = "step",
    decay_epochs: Sequence[float] = (30, 60, 80),
    decay_factor: float = 0.1,
    num_epochs: float = 90,
    scaling: str = "linear",
    noise_scale: float = 0.0,
    max_learning_rate: float = 0.0,
) -> optax.Schedule:
    """Per-iteration learning rate of Goyal et al.: warmup, then decay.

    Let eta = ``base_learning_rate``, k*eta = the peak rate for kn
    (``scaled_learning_rate(scaling, eta, kn, base_batch_size, ...)``;
    the Linear Scaling Rule by default), W = ``warmup_epochs * steps_per_epoch`` and
    T = ``num_epochs * steps_per_epoch``; fractional epochs are rounded up
    to the first whole iteration at or after them. The
    schedule maps the 0-based iteration t to

    warmup (section 2.2), for t < W:
      * ``'gradual'``:  eta + (k*eta - eta) * t / W -- starts at eta (not at 0)
        and rises every iteration, reaching k*eta at t = W.
      * ``'constant'``: eta, then a jump to k*eta at t = W.
      * ``'none'``:     k*eta from t = 0 (W is taken as 0).

    decay, for t >= W:
      * ``'step'``:   k*eta * decay_factor ** (number of boundaries <= t), a
        boundary being step ``e * steps_per_epoch`` (rounded up) for e in
        ``decay_epochs``; at the boundary step the new rate already applies.
        (The multiplier also applies inside warmup if a boundary falls there.)
      * ``'cosine'``: k*eta * (1 + cos(pi * (t - W) / (T - W))) / 2, reaching 0
        at t = T and staying 0 after.
      * ``'none'``:   k*eta.

    If k*eta <= eta (with the linear rule: kn <= ``base_batch_size``) there is
    nothing to warm up: W is taken as 0, whatever ``warmup`` says, and the
    schedule starts at k*eta.

    Raises:
      ValueError: unknown ``warmup`` or ``decay`` name, or a non-positive
        ``steps_per_epoch``.
    """
    check_choice("warmup", warmup, WARMUPS)
    check_choice("decay", decay, DECAYS)
    if int(steps_per_epoch) < 1:
        raise ValueError(f"steps_per_epoch: must be >= 1, got {steps_per_epoch!r}")

    eta = float(base_learning_rate)
    peak = scaled_learning_rate(
        scaling, eta, global_batch_size, base_batch_size, noise_scale=noise_scale, max_learning_rate=max_learning_rate
    )
    warmup_steps = _epoch_to_step(warmup_epochs, steps_per_epoch)
    if warmup == "none" or peak <= eta:
        warmup_steps = 0
    total_steps = _epoch_to_step(num_epochs, steps_per_epoch)
    boundaries = sorted(_epoch_to_step(e, steps_per_epoch) for e in decay_epochs)
    cosine_steps = max(total_steps - warmup_steps, 1)

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        if decay == "cosine":
            # (1 + cos(pi p)) / 2 == sin(pi (1 - p) / 2)^2; the sine form keeps
            # the last iterations' small rates accurate in float32.
            remaining = jnp.clip((total_steps - t) / cosine_steps, 0.0, 1.0)
            after = peak * jnp.sin(0.5 * jnp.pi * remaining) ** 2
        else:
            after = jnp.asarray(peak, jnp.float32)
        if warmup == "gradual" and warmup_steps > 0:
            during = eta + (peak - eta) * t / warmup_steps
        else:
            during = jnp.asarray(eta, jnp.float32)
        lr = jnp.where(t < warmup_steps, during, after)
        if decay == "step" and boundaries:
            passed = sum((t >= b).astype(jnp.float32) for b in boundaries)
            lr = lr * jnp.float32(decay_factor) ** passed
        return lr.astype(jnp.float32)

    return schedule
