"""Large-minibatch SGD as in Goyal et al. 2017, as optax transforms.

"Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", arXiv:1706.02677.
Notation follows the paper: k workers, n examples per worker, global minibatch
kn, reference rate eta for a minibatch of 256.

  * ``linear_scaling``  -- Linear Scaling Rule (section 2.1).
  * ``sqrt_scaling``, ``saturating_scaling``, ``scaled_learning_rate`` --
                           the square-root rule, and a rule that levels off
                           at eta_max beyond the gradient noise scale
                           (McCandlish et al. 2018, eq. 2.6).
  * ``goyal_schedule``  -- gradual / constant warmup (section 2.2), then step
                           or cosine decay.
  * ``momentum_sgd``    -- momentum SGD in the eq. (10) form with the
                           momentum correction of Remark 2.
  * ``goyal_sgd``       -- L2 weight decay as a separate gradient term
                           (Remark 1), no decay on BN gamma/beta or biases,
                           then ``momentum_sgd``.
  * ``lars``            -- LARS (You et al. 2017) on top of ``momentum_sgd``,
                           with optax's or the paper's trust ratio
                           (``scale_by_paper_trust_ratio``).
  * ``from_config``     -- builds (transform, schedule) from a config object.

This module depends only on jax and optax so that it can be copied into other
projects as a single file.
"""

from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import optax

ScalarOrSchedule = Union[float, optax.Schedule]

WARMUPS = ("gradual", "constant", "none")
DECAYS = ("step", "cosine", "none")
OPTIMIZERS = ("goyal_sgd", "lars", "sgd")
TRUST_RATIOS = ("optax", "paper")
LR_SCALINGS = ("linear", "sqrt", "saturating")


def _check_choice(field: str, value: Any, valid: Sequence[str]) -> None:
    if value not in valid:
        choices = ", ".join(repr(v) for v in valid)
        raise ValueError(f"{field}: unknown value {value!r}; valid values are {choices}")


# ---------------------------------------------------------------------------
# Learning rate
# ---------------------------------------------------------------------------


def _epoch_to_step(epochs: float, steps_per_epoch: int) -> int:
    """First iteration at or after ``epochs`` epochs (ceil, robust to float noise)."""
    x = round(float(epochs) * steps_per_epoch, 6)
    n = int(x)
    return n if n == x else n + 1


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
    _check_choice("lr_scaling", rule, LR_SCALINGS)
    if rule == "linear":
        return linear_scaling(base_learning_rate, global_batch_size, base_batch_size)
    if rule == "sqrt":
        return sqrt_scaling(base_learning_rate, global_batch_size, base_batch_size)
    if not noise_scale > 0:
        raise ValueError(f"lr_scaling='saturating' needs a gradient noise scale B_noise > 0, got {noise_scale!r}")
    eta_max = max_learning_rate or linear_scaling(base_learning_rate, noise_scale, base_batch_size)
    return saturating_scaling(eta_max, noise_scale, global_batch_size)


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
    _check_choice("warmup", warmup, WARMUPS)
    _check_choice("decay", decay, DECAYS)
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


# ---------------------------------------------------------------------------
# Momentum SGD, eq. (10) with the Remark 2 correction
# ---------------------------------------------------------------------------


class MomentumSGDState(NamedTuple):
    """State of ``momentum_sgd``.

    Attributes:
      velocity: v, the displacement of the last step (w <- w - v); same tree
        as the params.
      prev_learning_rate: the rate eta_t used by the last step (0 before the
        first step).
      count: number of steps taken; the schedule is evaluated at this count.
    """

    velocity: optax.Updates
    prev_learning_rate: jax.Array
    count: jax.Array


def momentum_sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.9,
    *,
    nesterov: bool = False,
    momentum_correction: bool = True,
) -> optax.GradientTransformation:
    """Momentum SGD in Goyal et al.'s eq. (10) form (Caffe2's), with Remark 2.

    Eq. (10) keeps the velocity as a displacement that already contains the rate:

        v_{t+1} = m * v_t + eta_{t+1} * g_t
        w_{t+1} = w_t - v_{t+1}

    When eta changes, eq. (10) is no longer equivalent to the textbook eq. (9)
    form (u_{t+1} = m u_t + g_t, w_{t+1} = w_t - eta_{t+1} u_{t+1}). Remark 2's
    momentum correction restores the equivalence by rescaling the old velocity:

        v_{t+1} = m * (eta_{t+1} / eta_t) * v_t + eta_{t+1} * g_t

    so that v_t = eta_t * u_t at every step, and the trajectory equals
    ``optax.sgd(learning_rate, momentum)`` (for rates that are never 0).
    ``momentum_correction=False`` gives the plain eq. (10) update, which
    differs right after a rate change by m * (1 - eta_{t+1}/eta_t) * v_t in v.

    Nesterov (``nesterov=True``) uses the same eq. (10) velocity and steps by
    w_{t+1} = w_t - (eta_{t+1} * g_t + m * v_{t+1}), the eq. (10) image of
    eq. (9)'s w - eta (g + m u_{t+1}); with the correction it equals
    ``optax.sgd(learning_rate, momentum, nesterov=True)``.

    The rate ratio when eta_t = 0 (before the first step, or after a step whose
    rate was 0) is defined as 1. This avoids 0/0 and loses nothing: with the
    correction on, v_t = eta_t * u_t = 0 then, so v_{t+1} = eta_{t+1} * g_t
    whatever the ratio. Note that at a zero-rate step the two forms genuinely
    disagree: eq. (9) still accumulates g into u, eq. (10) carries no momentum
    out of a step that did not move; this follows eq. (10).

    Args:
      learning_rate: a float, or an optax schedule evaluated at the step count
        (0 for the first step), as ``optax.sgd`` does.
      momentum: m.
      nesterov: use the Nesterov step above.
      momentum_correction: apply Remark 2's eta_{t+1}/eta_t rescaling.

    Returns:
      An ``optax.GradientTransformation`` whose updates are -v (or the Nesterov
      step), to be added to the params with ``optax.apply_updates``.
    """
    schedule = learning_rate if callable(learning_rate) else None

    def init_fn(params):
        velocity = jax.tree.map(jnp.zeros_like, params)
        return MomentumSGDState(
            velocity=velocity,
            prev_learning_rate=jnp.zeros([], jnp.float32),
            count=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None):
        del params
        if schedule is None:
            lr = jnp.asarray(learning_rate, jnp.float32)
        else:
            lr = jnp.asarray(schedule(state.count), jnp.float32)
        if momentum_correction:
            prev = state.prev_learning_rate
            safe_prev = jnp.where(prev == 0.0, 1.0, prev)
            ratio = jnp.where(prev == 0.0, 1.0, lr / safe_prev)
        else:
            ratio = jnp.ones([], jnp.float32)

        def new_velocity(g, v):
            return (momentum * ratio * v + lr * g).astype(v.dtype)

        velocity = jax.tree.map(new_velocity, updates, state.velocity)
        if nesterov:
            steps = jax.tree.map(lambda g, v: -(lr * g + momentum * v).astype(v.dtype), updates, velocity)
        else:
            steps = jax.tree.map(jnp.negative, velocity)
        new_state = MomentumSGDState(
            velocity=velocity,
            prev_learning_rate=lr,
            count=optax.safe_int32_increment(state.count),
        )
        return steps, new_state

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# Weight decay and the full optimizers
# ---------------------------------------------------------------------------

_DECAYED_NAMES = frozenset({"kernel", "embedding"})
_UNDECAYED_NAMES = frozenset({"bias", "scale"})


def _leaf_name(path) -> Optional[str]:
    """Name of the innermost dict key / attribute in a pytree key path."""
    for key in reversed(path):
        if isinstance(key, jax.tree_util.DictKey):
            return str(key.key)
        if isinstance(key, jax.tree_util.GetAttrKey):
            return key.name
    return None


def weight_decay_mask(params: optax.Params) -> Any:
    """True for leaves that get weight decay, False for the rest.

    Goyal et al. apply decay to weights but not to BN's learnable gamma and
    beta (their experimental settings); biases are not decayed either. The rule, by the leaf's innermost dict key (Flax linen names):

      * ``'kernel'``, ``'embedding'``  -> True  (conv / dense weights, embeddings)
      * ``'bias'``, ``'scale'``        -> False (biases, BN/LayerNorm beta and gamma)
      * any other name, or no name     -> ``ndim > 1`` (matrices and conv
        filters decay, vectors and scalars do not)

    Returns a pytree of Python bools with the structure of ``params``, usable
    as an optax mask (or call it lazily: optax accepts the function itself).
    """

    def decide(path, leaf):
        name = _leaf_name(path)
        if name in _DECAYED_NAMES:
            return True
        if name in _UNDECAYED_NAMES:
            return False
        return jnp.ndim(leaf) > 1

    return jax.tree_util.tree_map_with_path(decide, params)


MaskOrFn = Union[Any, Callable[[optax.Params], Any], None]


def goyal_sgd(
    learning_rate: ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 1e-4,
    mask: MaskOrFn = weight_decay_mask,
    momentum_correction: bool = True,
) -> optax.GradientTransformation:
    """Goyal et al.'s optimizer: masked L2 weight decay, then ``momentum_sgd``.

    The decay is added to the gradient as its own term (Remark 1: it is not
    obtained by scaling the loss, which would also scale it by the loss
    factor), only on the leaves where ``mask`` is True:

        g'_t = g_t + lambda * w_t                         (masked)
        v_{t+1} = m * (eta_{t+1}/eta_t) * v_t + eta_{t+1} * g'_t   (eq. 10, Remark 2)

    then w <- w - v_{t+1} (or the Nesterov step, see ``momentum_sgd``). The
    default ``nesterov=True`` follows the paper's experimental settings
    (Nesterov momentum, m = 0.9, lambda = 1e-4); ``mask=None``
    decays every leaf. ``update`` must be called with ``params``.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=mask),
        momentum_sgd(
            learning_rate,
            momentum,
            nesterov=nesterov,
            momentum_correction=momentum_correction,
        ),
    )


def scale_by_paper_trust_ratio(
    weight_decay: float,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
) -> optax.GradientTransformation:
    """LARS's local learning rate as You et al. define it, weight decay included.

    You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional
    Networks" (arXiv:1708.03888), section 3: the local learning rate of layer l
    with weight decay beta and the step of Algorithm 1,

        lambda^l = eta * ||w^l|| / (||grad L(w^l)|| + beta * ||w^l||)
        d^l      = lambda^l * (grad L(w^l) + beta * w^l)

    where eta = ``trust_coefficient``, beta = ``weight_decay`` and grad L is the
    loss gradient *without* the decay term; ``eps`` is added to the
    denominator. Each array is one layer. As ``optax.scale_by_trust_ratio``,
    lambda is taken as 1 where ||w|| = 0 or the denominator is 0.

    The incoming updates must be the plain loss gradients (this transform adds
    the decay itself; do not put ``add_decayed_weights`` before it), and
    ``update`` must be called with ``params``. It applies to every leaf it is
    given: wrap it in ``optax.masked`` to leave biases and BN parameters alone
    (``lars`` does). Stateless.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_paper_trust_ratio: update needs params")

        def scale(g, w):
            w_norm = jnp.linalg.norm(w)
            denominator = jnp.linalg.norm(g) + weight_decay * w_norm + eps
            degenerate = (w_norm == 0.0) | (denominator == 0.0)
            ratio = jnp.where(degenerate, 1.0, trust_coefficient * w_norm / jnp.where(degenerate, 1.0, denominator))
            return (ratio * (g + weight_decay * w)).astype(g.dtype)

        return jax.tree.map(scale, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def lars(
    learning_rate: ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    mask: MaskOrFn = weight_decay_mask,
    momentum_correction: bool = True,
    nesterov: bool = False,
    trust_ratio: str = "optax",
) -> optax.GradientTransformation:
    """LARS (You, Gitman, Ginsburg 2017, Algorithm 1) on ``momentum_sgd``.

    For each array w where ``mask`` is True, with global rate eta_t, loss
    gradient g and lambda = ``weight_decay``:

        d       = g + lambda * w
        ratio   = trust_coefficient * ||w|| / (D + eps)
                  (1 if ||w|| = 0 or D = 0, as optax.scale_by_trust_ratio)
        v_{t+1} = m * (eta_{t+1}/eta_t) * v_t + eta_{t+1} * ratio * d
        w      <- w - v_{t+1}

    with the denominator D chosen by ``trust_ratio``:

      * ``'optax'`` (default): D = ||g + lambda * w||, optax's ``lars``
        composition (add_decayed_weights -> masked scale_by_trust_ratio);
        the step length is then trust_coefficient * eta * ||w|| exactly.
      * ``'paper'``: D = ||g|| + lambda * ||w||, the paper's local learning
        rate with weight decay (section 3 of arXiv:1708.03888; see
        ``scale_by_paper_trust_ratio``). By the triangle inequality this D is
        >= optax's, so the paper's steps are never longer; for lambda = 0 the
        two are the same.

    Arrays where ``mask`` is False (BN gamma/beta, biases) get neither decay
    nor trust-ratio scaling: plain momentum SGD at the global rate eta_t.

    The momentum is the eq. (10) velocity of ``momentum_sgd`` with Remark 2's
    correction, which is exactly Algorithm 1's
    v <- m v + gamma_t * lambda^l * (g + beta w).
    ``nesterov=True`` uses the Nesterov step of ``momentum_sgd``.

    Raises:
      ValueError: ``trust_ratio`` is not 'optax' or 'paper'.
    """
    _check_choice("trust_ratio", trust_ratio, TRUST_RATIOS)
    everything = lambda p: jax.tree.map(lambda _: True, p)  # noqa: E731
    layer_mask = mask if mask is not None else everything
    if trust_ratio == "paper":
        scaling = [optax.masked(scale_by_paper_trust_ratio(weight_decay, trust_coefficient, eps), layer_mask)]
    else:
        scaling = [
            optax.add_decayed_weights(weight_decay, mask=mask),
            optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps), layer_mask),
        ]
    return optax.chain(
        *scaling,
        momentum_sgd(
            learning_rate,
            momentum,
            nesterov=nesterov,
            momentum_correction=momentum_correction,
        ),
    )


# ---------------------------------------------------------------------------
# Config entry point
# ---------------------------------------------------------------------------


def _scaling_of(config: Any) -> Tuple[str, dict]:
    """``config.lr_scaling`` (default linear) and the saturating rule's inputs, as keyword arguments."""
    rule = getattr(config, "lr_scaling", "linear")
    return rule, dict(
        noise_scale=float(getattr(config, "b_noise", 0.0)), max_learning_rate=float(getattr(config, "lr_max", 0.0))
    )


def peak_learning_rate(config: Any) -> float:
    """The rate after warmup for ``config``'s k * n examples under ``config.lr_scaling`` (default linear)."""
    rule, kwargs = _scaling_of(config)
    global_batch_size = int(config.num_workers) * int(config.per_worker_batch_size)
    return scaled_learning_rate(
        rule, config.base_learning_rate, global_batch_size, getattr(config, "base_batch_size", 256), **kwargs
    )


def from_config(config: Any, steps_per_epoch: int) -> Tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds ``(transform, schedule)`` from a config with attribute access.

    Required attributes: ``num_workers`` (k), ``per_worker_batch_size`` (n),
    ``base_learning_rate`` (eta per ``base_batch_size`` examples), ``warmup``,
    ``warmup_epochs``, ``num_epochs``, ``optimizer`` (``'goyal_sgd'``,
    ``'lars'`` or ``'sgd'``; ``'sgd'`` is ``momentum_sgd`` without weight
    decay). Optional, with defaults: ``base_batch_size``=256,
    ``decay``='step', ``decay_epochs``=(30, 60, 80), ``decay_factor``=0.1,
    ``momentum``=0.9, ``nesterov``=True, ``weight_decay``=1e-4,
    ``momentum_correction``=True, ``trust_coefficient``=0.001,
    ``lars_trust_ratio``='optax' (``'optax'`` or ``'paper'``, see ``lars``),
    ``lr_scaling``='linear' (or ``'sqrt'``, ``'saturating'``; see
    ``scaled_learning_rate``), ``b_noise`` and ``lr_max`` (the saturating
    rule's B_noise and eta_max; 0 = derived, see there).

    The global minibatch is always k * n (never read from the config); the
    schedule is ``goyal_schedule`` of it and is also what the transform uses.

    Raises:
      ValueError: unknown ``config.optimizer``, ``config.warmup``,
        ``config.decay`` or ``config.lars_trust_ratio``; the message names the
        field.
      AttributeError: a required attribute is missing.
    """
    optimizer = config.optimizer
    _check_choice("config.optimizer", optimizer, OPTIMIZERS)
    decay = getattr(config, "decay", "step")
    _check_choice("config.warmup", config.warmup, WARMUPS)
    _check_choice("config.decay", decay, DECAYS)
    trust_ratio = getattr(config, "lars_trust_ratio", "optax")
    _check_choice("config.lars_trust_ratio", trust_ratio, TRUST_RATIOS)
    global_batch_size = int(config.num_workers) * int(config.per_worker_batch_size)
    rule, scaling_kwargs = _scaling_of(config)
    schedule = goyal_schedule(
        config.base_learning_rate,
        global_batch_size,
        steps_per_epoch,
        base_batch_size=getattr(config, "base_batch_size", 256),
        warmup=config.warmup,
        warmup_epochs=config.warmup_epochs,
        decay=decay,
        decay_epochs=tuple(getattr(config, "decay_epochs", (30, 60, 80))),
        decay_factor=getattr(config, "decay_factor", 0.1),
        num_epochs=config.num_epochs,
        scaling=rule,
        **scaling_kwargs,
    )

    momentum = getattr(config, "momentum", 0.9)
    nesterov = bool(getattr(config, "nesterov", True))
    correction = bool(getattr(config, "momentum_correction", True))
    weight_decay = getattr(config, "weight_decay", 1e-4)
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
            trust_coefficient=getattr(config, "trust_coefficient", 0.001),
            momentum_correction=correction,
            nesterov=nesterov,
            trust_ratio=trust_ratio,
        )
    else:
        tx = momentum_sgd(schedule, momentum, nesterov=nesterov, momentum_correction=correction)
    return tx, schedule
