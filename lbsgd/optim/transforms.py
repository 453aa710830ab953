"""The optimizers as optax transforms: eq. (10) momentum SGD, Goyal et al.'s SGD and LARS.

  * ``momentum_sgd``      -- momentum SGD in Goyal et al. 2017's eq. (10) form with the momentum
                             correction of Remark 2 (state: ``MomentumSGDState``).
  * ``weight_decay_mask`` -- which leaves get weight decay: not BN gamma/beta, not biases.
  * ``goyal_sgd``         -- L2 weight decay as a separate gradient term (Remark 1), masked by
                             ``weight_decay_mask``, then ``momentum_sgd``.
  * ``scale_by_paper_trust_ratio`` -- LARS's local learning rate as You et al. 2017 define it
                             (section 3 of arXiv:1708.03888), weight decay included.
  * ``lars``              -- LARS (You et al. 2017, Algorithm 1) on top of ``momentum_sgd``, with
                             optax's or the paper's trust ratio (``TRUST_RATIOS``).

``OPTIMIZERS`` names the optimizers ``lbsgd.optim.factory.from_config`` can build.

Pure: depends only on jax and optax.
"""

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from lbsgd.optim._choices import check_choice

ScalarOrSchedule = Union[float, optax.Schedule]

OPTIMIZERS = ("goyal_sgd", "lars", "sgd")
TRUST_RATIOS = ("optax", "paper")


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
    check_choice("trust_ratio", trust_ratio, TRUST_RATIOS)
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
