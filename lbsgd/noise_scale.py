"""The gradient noise scale B_simple = tr(Σ) / |G|² (McCandlish et al. 2018), estimated during training.

"An Empirical Model of Large-Batch Training", arXiv:1812.06162. G is the true gradient of the mean
loss, Σ the covariance of one example's gradient. A batch of B examples gives an estimate G_B with
E|G_B|² = |G|² + tr(Σ)/B. Two batch sizes B_small < B_big seen in the same step give unbiased
estimates of both (their Appendix A.1):

    |G|²  ≈ (B_big |G_big|² − B_small |G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

In Goyal's terms the train step already has both, with no extra forward or backward pass: each
worker's gradient over its n examples (B_small = n; ``|G_small|²`` is the mean over the k workers, which
lowers the variance) and their combination over kn (B_big = kn). Single-step estimates are noisy, so
both are averaged with an exponential moving average (bias-corrected) before the ratio is taken, as
McCandlish et al. do. The state also sums both estimates over the whole run: their ratio is the noise
scale averaged over training (``noise_scale_run``), the value to predict a critical batch size from
(the noise scale grows as the loss falls). Pure jax; the state is a dict of float32 scalars carried in
``TrainState``.
"""

from __future__ import annotations

import jax.numpy as jnp

DEFAULT_DECAY = 0.99  # the moving average's decay per step


def init() -> dict:
    """A fresh state: moving averages of both estimates, the weight 1 − decay^t they carry, and plain sums."""
    zero = jnp.zeros((), jnp.float32)
    return {"g2": zero, "trace": zero, "weight": zero, "sum_g2": zero, "sum_trace": zero}


def estimates(small_sq, big_sq, b_small: int, b_big: int):
    """Unbiased single-step estimates ``(|G|², tr(Σ))`` from ``|G_small|²`` over batches of ``b_small``
    examples and ``|G_big|²`` over ``b_big`` examples (McCandlish et al. 2018, Appendix A.1)."""
    if not 0 < b_small < b_big:
        raise ValueError(f"the noise scale needs two batch sizes 0 < B_small < B_big, got {b_small} and {b_big}")
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


def update(state: dict, small_sq, big_sq, b_small: int, b_big: int, decay: float = DEFAULT_DECAY) -> dict:
    """The state after one step's estimates (exponential moving average with ``decay``)."""
    g2, trace = (jnp.asarray(e, jnp.float32) for e in estimates(small_sq, big_sq, b_small, b_big))
    mix = lambda old, new: decay * old + (1.0 - decay) * new  # noqa: E731
    return {
        "g2": mix(state["g2"], g2),
        "trace": mix(state["trace"], trace),
        "weight": mix(state["weight"], jnp.float32(1.0)),
        "sum_g2": state["sum_g2"] + g2,
        "sum_trace": state["sum_trace"] + trace,
    }


def read(state: dict) -> dict:
    """Bias-corrected moving averages: ``noise_scale`` (B_simple = tr(Σ)/|G|², in examples), ``noise_g2``
    (|G|²) and ``noise_trace`` (tr(Σ)); and ``noise_scale_run``, the ratio of the sums over every step so
    far. NaN before the first step."""
    weight = jnp.where(state["weight"] > 0, state["weight"], jnp.nan)
    g2, trace = state["g2"] / weight, state["trace"] / weight
    run = state["sum_trace"] / jnp.where(state["sum_g2"] != 0, state["sum_g2"], jnp.nan)
    return {"noise_scale": trace / g2, "noise_g2": g2, "noise_trace": trace, "noise_scale_run": run}
