"""The one gradient routine: a device's m workers, each on its own n examples with its own BN statistics.

A worker's loss is the sum of its per-example cross-entropies divided by the strategy's denominator:
k·n when the gradients are summed over all workers (Goyal et al. Remark 3), n when each worker steps on
its own. ``worker_gradients`` differentiates the device's m workers

* at one shared copy of the parameters, their gradients summed (allreduce, the parameter server's sum
  is taken by the strategy), or at each worker's own parameters (a leading worker axis), one gradient
  per worker;
* in ``microsteps`` sequential groups of whole workers (gradient accumulation: each worker's n examples
  stay together, so its BN statistics, and the result, do not change);
* optionally with Σ over the workers of each one's squared gradient norm (the gradient noise scale of
  McCandlish et al. 2018 needs it).

How a group of workers is differentiated: shared parameters without norms in one ``vmap`` over workers
(one program, the batch of all workers); per-worker parameters, or shared ones whose per-worker norms
are needed, one worker after another (unrolled). ``vmap`` would batch different workers' kernels into
grouped convolutions, whose gradients XLA's CPU backend runs ~15x slower than the same convolutions one
at a time (measured: ResNet-20, 8 workers, 1.45 s vs 0.095 s); a ``lax.scan`` over workers ran ~4x
slower than unrolling on the same backend (digits ResNet-8, k = 8 x 16: 95 -> 24 ms on 8 devices).

**BatchNorm groups** (``bn_group`` = g, a divisor of k; Goyal §2.3 makes the BN batch a hyperparameter
apart from kn): the batch statistics of every BN layer are over the g·n examples of g consecutive
workers, one BatchNorm over them (Flax's E[x²] − E[x]²). g = 1 is the per-worker BN above, unchanged;
g = k is synchronised BN over all kn examples. A device's workers are differentiated as *units*
(``bn_units``): when g divides m, m/g units of g workers, each one forward over its g·n examples (the
batch of one BN, no communication); when m divides g (a group spans g/m devices), the device's m
workers are one unit and every BN layer averages its batch mean and mean square over the group's
devices (``group_model``: ``lax.pmean`` with ``axis_index_groups``; the transpose of that ``psum`` in
the backward pass carries each device's share of the gradient back to the devices of its group).
Equal-sized parts make the mean of the parts' means the group's mean, so the numbers are those of one
BatchNorm over the group on any layout (float summation order aside). The loss is unchanged (Σ ce /
kn summed over the units, Remark 3). Every worker of a group holds the group's running statistics
(each step starts from its first worker's, so a group's workers cannot drift apart).
Groups need one shared copy of the parameters at which every worker differentiates (a group's
workers are one model), and no per-worker gradients (the noise scale's norms): ``check_bn_group``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels."""
    num_classes = logits.shape[-1]
    targets = (
        optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
        if label_smoothing
        else jax.nn.one_hot(labels, num_classes)
    )
    return optax.softmax_cross_entropy(logits, targets)


def make_worker_loss(model, denominator: int, label_smoothing: float = 0.0) -> Callable:
    """``(params, stats, x, y) -> (Σ ce / denominator, (new BN stats, Σ ce, correct))`` for one worker:
    forward on its n examples with its own BN statistics (§2.3)."""

    def worker_loss(params, stats, x, y):
        logits, new_vars = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        ce = cross_entropy(logits, y, label_smoothing)
        correct = jnp.sum(jnp.argmax(logits, -1) == y)
        return jnp.sum(ce) / denominator, (new_vars.get("batch_stats", {}), jnp.sum(ce), correct)

    return worker_loss


class Gradients(NamedTuple):
    """What ``worker_gradients`` returns for a device's m workers."""

    grads: Any  # summed over the workers (shared parameters) or one per worker ([m, ...] leaves)
    batch_stats: Any  # each worker's new BN running statistics, [m, ...] leaves
    ce_sum: Any  # Σ of the per-example cross-entropies over the m·n examples
    correct: Any  # correct predictions among them
    sq_norms: Any  # Σ over workers of |g_w|² (float32), or None when not asked for


def sq_norm(tree):
    """Σ of the squared entries of every leaf, in float32."""
    return sum(jnp.sum(jnp.square(t.astype(jnp.float32))) for t in jax.tree.leaves(tree))


def _stack(outs):
    return jax.tree.map(lambda *t: jnp.stack(t), *outs)


def _group_gradients(worker_loss, params, stats, x, y, per_worker: bool, norms: bool) -> Gradients:
    """One group of g workers ([g, ...] stats, x, y; params shared or [g, ...])."""
    if not (per_worker or norms):  # shared parameters: one vmapped program, the workers' losses summed

        def group_loss(p):
            losses, aux = jax.vmap(worker_loss, in_axes=(None, 0, 0, 0))(p, stats, x, y)
            return jnp.sum(losses), aux

        grads, (new_stats, ce, correct) = jax.grad(group_loss, has_aux=True)(params)
        return Gradients(grads, new_stats, jnp.sum(ce), jnp.sum(correct), None)
    grad_fn = jax.grad(worker_loss, has_aux=True)
    total = None if per_worker else jax.tree.map(jnp.zeros_like, params)
    outs, per, sq = [], [], jnp.zeros((), jnp.float32)
    for w in range(x.shape[0]):  # unrolled, one worker after another
        at = jax.tree.map(lambda t: t[w], params) if per_worker else params
        g_w, aux = grad_fn(at, jax.tree.map(lambda t: t[w], stats), x[w], y[w])
        if per_worker:
            per.append(g_w)
        else:
            total = jax.tree.map(jnp.add, total, g_w)
        if norms:
            sq = sq + sq_norm(g_w)
        outs.append(aux)
    new_stats, ce, correct = _stack(outs)
    grads = _stack(per) if per_worker else total
    return Gradients(grads, new_stats, jnp.sum(ce), jnp.sum(correct), sq if norms else None)


def worker_gradients(
    worker_loss,
    params,
    batch_stats,
    images,
    labels,
    *,
    n: int,
    microsteps: int = 1,
    per_worker: bool = False,
    norms: bool = False,
    bn_group: int = 1,
    axis: str = "",
) -> Gradients:
    """Gradients of a device's m workers (``images`` [m·n, ...], worker-major; ``batch_stats`` [m, ...]).

    ``per_worker``: ``params`` has a leading worker axis and each worker gets its own gradient; else the
    workers' gradients at the shared ``params`` are summed. ``microsteps`` = a (a divisor of m): the
    workers run in a sequential groups of m/a (``lax.scan``), gradients summed (shared) or concatenated
    (per worker). ``norms``: also Σ_w |g_w|² over the m workers. ``bn_group`` = g > 1: BN groups of g
    workers on mesh axis ``axis`` (``group_gradients``; ``worker_loss`` of ``group_model``).
    """
    if bn_group > 1:
        return group_gradients(
            worker_loss, params, batch_stats, images, labels, n=n, group_size=bn_group, axis=axis, microsteps=microsteps
        )
    m, a = images.shape[0] // n, microsteps
    g = m // a
    split = lambda t: t.reshape(a, g, *t.shape[1:])  # noqa: E731 - [m, ...] -> [a, m/a, ...]
    x, y = images.reshape(a, g, n, *images.shape[1:]), labels.reshape(a, g, n)
    stats = jax.tree.map(split, batch_stats)
    group = lambda p, s, xs, ys: _group_gradients(worker_loss, p, s, xs, ys, per_worker, norms)  # noqa: E731
    if a == 1:
        return group(params, *jax.tree.map(lambda t: t[0], (stats, x, y)))
    if per_worker:

        def microstep(_, inputs):
            return None, group(*inputs)

        _, out = jax.lax.scan(microstep, None, (jax.tree.map(split, params), stats, x, y))
        grads = jax.tree.map(lambda t: t.reshape(m, *t.shape[2:]), out.grads)
    else:

        def microstep(acc, inputs):
            o = group(params, *inputs)
            return jax.tree.map(jnp.add, acc, o.grads), o._replace(grads=None)

        grads, out = jax.lax.scan(microstep, jax.tree.map(jnp.zeros_like, params), (stats, x, y))
    new_stats = jax.tree.map(lambda t: t.reshape(m, *t.shape[2:]), out.batch_stats)
    sq = jnp.sum(out.sq_norms) if norms else None
    return Gradients(grads, new_stats, jnp.sum(out.ce_sum), jnp.sum(out.correct), sq)


def bn_units(workers_per_device: int, group_size: int) -> tuple[int, int]:
    """(units a device differentiates, workers per unit) for m workers per device and BN groups of g:
    (m/g, g) when g divides m, (1, m) when a group spans devices (m divides g)."""
    m, g = workers_per_device, group_size
    return (m // g, g) if g <= m else (1, m)


def check_bn_group(group_size: int, k: int, m: int, microsteps: int, per_worker: bool, norms: bool) -> None:
    """Raise ValueError unless BN groups of g workers fit: g divides k, g divides m or m divides g, the
    microsteps divide the units, one shared copy of the parameters, no per-worker gradient norms."""
    g = group_size
    if g == 1:
        return
    if g < 1 or k % g:
        raise ValueError(f"bn_group_size={g} must be a positive divisor of the k={k} workers")
    if m % g and g % m:
        raise ValueError(f"bn_group_size={g} must divide, or be a multiple of, the {m} workers per device")
    units = bn_units(m, g)[0]
    if units % microsteps:
        raise ValueError(f"accumulation_steps={microsteps} must divide the {units} BN groups per device")
    if per_worker:
        raise ValueError(f"bn_group_size={g} needs the workers' gradients at one shared copy of the parameters")
    if norms:
        raise ValueError(f"bn_group_size={g}: the gradient noise scale needs per-worker BN (bn_group_size=1)")


def device_groups(group_size: int, workers_per_device: int, num_devices: int):
    """(span, groups): a BN group spans ``span`` = g/m consecutive devices (1: within one device);
    ``groups`` are their mesh positions for ``axis_index_groups`` (None: one group of every device)."""
    span = max(1, group_size // workers_per_device)
    if span in (1, num_devices):
        return span, None
    return span, tuple(tuple(range(s, s + span)) for s in range(0, num_devices, span))


def group_model(model, group_size: int, workers_per_device: int, num_devices: int, axis: str):
    """``model``, or, when a BN group spans g/m devices, a clone whose BN layers average their batch
    mean and mean square over the group's consecutive devices of mesh axis ``axis`` (all when g = k).
    The model needs ``bn_axis_name``/``bn_axis_index_groups`` attributes (``lbsgd.models.resnet.ResNet``)."""
    span, groups = device_groups(group_size, workers_per_device, num_devices)
    if span == 1:
        return model
    if not hasattr(model, "bn_axis_name"):
        raise ValueError(f"a BN group spanning devices needs a model with bn_axis_name, not {type(model).__name__}")
    return model.clone(bn_axis_name=axis, bn_axis_index_groups=groups)


def _group_first(stats, span: int, axis: str, groups):
    """Each unit's running statistics: its first worker's, and, when a group spans devices, those of the
    group's first device (a psum of them and zeros: exact), so every worker of a group starts equal."""
    if span == 1:
        return stats
    first = jax.lax.axis_index(axis) % span == 0
    return jax.lax.psum(jax.tree.map(lambda t: jnp.where(first, t, 0), stats), axis, axis_index_groups=groups)


def group_gradients(
    worker_loss, params, batch_stats, images, labels, *, n: int, group_size: int, axis: str, microsteps: int = 1
):
    """``worker_gradients`` with BN groups of g workers (``bn_units``): each unit of workers forwards its
    examples as one BN batch from its group's first worker's running statistics, and every worker of
    the unit gets the unit's new statistics. ``worker_loss`` is of ``group_model``; shared parameters,
    gradients summed; ``axis``: the mesh axis (a group may span devices)."""
    m = images.shape[0] // n
    per = bn_units(m, group_size)[1]
    span, groups = device_groups(group_size, m, jax.lax.axis_size(axis))
    stats = _group_first(jax.tree.map(lambda t: t[::per], batch_stats), span, axis, groups)
    out = worker_gradients(worker_loss, params, stats, images, labels, n=per * n, microsteps=microsteps)
    return out._replace(batch_stats=jax.tree.map(lambda t: jnp.repeat(t, per, axis=0), out.batch_stats))
