"""The train step of k workers x n examples, per device (``jax.shard_map`` over the 1-D device mesh):

1. **prepare** — the strategy says at which parameters each worker takes its gradient (the shared copy
   for allreduce, each worker's own copy for decentralized strategies, a stale pull for the parameter
   server);
2. **gradients** — each of the device's m = k/d workers forwards its own n examples with its own
   BatchNorm statistics (§2.3) and differentiates its loss Σ ce / (k·n) (Remark 3) or / n
   (``lbsgd.trainer.grads``, optionally in ``accumulation_steps`` microsteps of whole workers), or
   with ``bn_group_size`` = g each BN group's g·n examples together;
3. **reduce** — the strategy turns the workers' gradients into the gradient of the step (allreduce: Σ
   over all k, ``config.aggregation``, §4);
4. **apply** — the strategy's optimizer step(s) and any mixing (``lbsgd.optim``'s Goyal update);
5. **non-finite guard** — a step whose loss or gradients hold a NaN or an infinity is flagged, and with
   ``skip_nonfinite`` changes nothing but the step and the counters;
6. **metrics** — loss and accuracy exact over the kn examples, the learning rate, the strategy's own.

Also the eval step (the strategy's evaluation model, BN running statistics averaged over the k workers)
and the consensus distance. Nothing here needs TensorFlow or a config library.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lbsgd import noise_scale as noise_scale_lib
from lbsgd.parallel import layout as layout_lib
from lbsgd.parallel import mixing
from lbsgd.parallel.layout import AXIS
from lbsgd.strategies.allreduce import Allreduce
from lbsgd.strategies.base import StepContext, Strategy
from lbsgd.trainer import grads as grads_lib
from lbsgd.trainer.state import TrainState, state_specs


def nonfinite_flag(ce_sum, grads):
    """1.0 when this device's summed loss or any entry of any gradient is NaN or ±inf, else 0.0 — from ONE
    reduction over every gradient entry, not one per leaf.

    The quantity is Σ over all entries of (g · 0): every finite entry contributes exactly 0, a NaN or an
    infinity contributes NaN (inf · 0 = NaN), and NaN survives the sum. So the sum is 0 or NaN — it cannot
    overflow to a false flag the way Σ g² can for large finite gradients, and a large finite value cannot
    hide a NaN. The leaves are read once, by one reduction over their concatenation (which XLA fuses into
    the reduction instead of materialising it).
    """
    flat = [jnp.ravel(t).astype(jnp.float32) for t in jax.tree.leaves(grads)]
    zero = jnp.sum(jnp.concatenate(flat) * 0.0) if flat else jnp.zeros((), jnp.float32)
    return 1.0 - (jnp.isfinite(ce_sum) & jnp.isfinite(zero))


def keep_if_nonfinite(finite, new: TrainState, old: TrainState) -> TrainState:
    """``new``, except that a non-finite step keeps the old parameters, optimizer and strategy state, BN
    statistics and noise estimate (every device decides alike: ``finite`` is psummed)."""
    keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)  # noqa: E731
    fields = ("params", "opt_state", "extra", "batch_stats", "noise")
    return new.replace(**{f: keep(getattr(new, f), getattr(old, f)) for f in fields})


def noise_update(noise, small_sq_sum, summed, k: int, n: int, decay: float):
    """The gradient noise scale's moving average after this step (McCandlish et al. 2018, App. A).

    Worker w's loss is Σ ce / (kn), so its gradient g_w is 1/k of the gradient of its mean loss G_n,w:
    the mean over workers of |G_n,w|² is k Σ_w |g_w|²; G_kn = Σ_w g_w (Remark 3) is ``summed``."""
    small_sq, big_sq = k * small_sq_sum, grads_lib.sq_norm(summed)
    noise = noise_scale_lib.update(noise, small_sq, big_sq, n, k * n, decay)
    return noise, noise_scale_lib.read(noise)


def _check(strategy: Strategy, k: int, m: int, a: int, noise_scale: bool) -> None:
    if m % a:
        raise ValueError(f"config.accumulation_steps={a} must divide the {m} workers per device")
    if noise_scale and not strategy.supports_noise_scale:
        raise ValueError(
            f"the gradient noise scale needs one shared gradient (strategy 'allreduce'), not {strategy.name!r}"
        )
    if noise_scale and k < 2:
        raise ValueError("the gradient noise scale compares one worker's gradient with k workers' sum: it needs k >= 2")


def make_train_step(
    model,
    tx,
    schedule,
    layout: layout_lib.WorkerLayout,
    *,
    per_worker_batch_size: int,
    strategy: Strategy | None = None,
    accumulation_steps: int = 1,
    label_smoothing: float = 0.0,
    skip_nonfinite: bool = False,
    noise_scale: bool = False,
    noise_scale_decay: float = noise_scale_lib.DEFAULT_DECAY,
    steps_per_dispatch: int = 1,
    bn_group_size: int = 1,
):
    """Build the jitted train step ``(state, images, labels) -> (state, metrics)``.

    ``images``/``labels`` are global arrays of k·n examples sharded over the mesh, worker-major (worker
    w's n examples are rows w·n .. w·n+n-1). ``strategy`` defaults to allreduce with ``psum``.

    ``metrics['nonfinite']`` is 1.0 when the loss or any worker's gradient was NaN or infinite (so the
    host learns it with the metrics, no extra sync); ``state.nonfinite`` counts such steps. With
    ``skip_nonfinite`` such a step changes nothing but the step and the counters (every worker skips
    it, like ``optax.apply_if_finite``); without, the caller must stop (the training loop does).

    ``noise_scale`` (a strategy whose ``reduce`` sums over all k, k >= 2; the state from
    ``create_train_state(noise_scale=True)``): also estimate the gradient noise scale from what the step
    computes anyway — each worker's gradient over its n examples and their sum over kn — and log
    ``noise_scale``, ``noise_g2`` and ``noise_trace``. The workers then take their gradients one after
    another, so that each one's norm is seen; off, nothing of it is traced.

    ``bn_group_size`` = g > 1: BN batch statistics over the g·n examples of g consecutive workers
    (``lbsgd.trainer.grads``; one shared copy of the parameters, no noise scale).

    ``steps_per_dispatch`` = s > 1 (MLPerf's device loop): one call takes s steps' batches stacked on a
    leading axis (``images`` [s', k·n, ...] for any s' — the last call of a run may hold fewer) and runs the
    steps in a ``lax.scan`` on the device, each exactly the single step; the metrics come back stacked [s'].
    """
    strategy = strategy or Allreduce()
    k, n, m, a = layout.num_workers, per_worker_batch_size, layout.workers_per_device, accumulation_steps
    _check(strategy, k, m, a, noise_scale)
    grads_lib.check_bn_group(bn_group_size, k, m, a, strategy.grad_per_worker, noise_scale)
    bn_model = grads_lib.group_model(model, bn_group_size, m, layout.num_devices, AXIS)
    worker_loss = grads_lib.make_worker_loss(bn_model, strategy.loss_denominator(k, n), label_smoothing)

    def per_device(state: TrainState, images, labels):
        ctx = StepContext(
            axis=AXIS, num_workers=k, num_devices=layout.num_devices, workers_per_device=m, step=state.step
        )
        grad_params = strategy.prepare(ctx, state.params, state.extra)
        out = grads_lib.worker_gradients(
            worker_loss, grad_params, state.batch_stats, images, labels,
            n=n, microsteps=a, per_worker=strategy.grad_per_worker, norms=noise_scale,
            bn_group=bn_group_size, axis=AXIS,
        )  # fmt: skip
        reduced = strategy.reduce(ctx, out.grads)
        params, opt_state, extra = strategy.apply(
            ctx, tx, state.params, state.opt_state, state.extra, grad_params, reduced
        )
        sums = [out.ce_sum, out.correct.astype(jnp.float32), nonfinite_flag(out.ce_sum, out.grads)]
        totals = jax.lax.psum(jnp.stack(sums + ([out.sq_norms] if noise_scale else [])), AXIS)
        finite = totals[2] == 0
        noise, noise_metrics = state.noise, {}
        if noise_scale:
            noise, noise_metrics = noise_update(state.noise, totals[3], reduced, k, n, noise_scale_decay)
        bad = 1 - finite.astype(jnp.int32)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            batch_stats=strategy.mix_batch_stats(ctx, out.batch_stats),
            opt_state=opt_state,
            extra=extra,
            nonfinite=jnp.stack([state.nonfinite[0] + bad, (state.nonfinite[1] + 1) * bad]),
            noise=noise,
        )
        if skip_nonfinite:
            new_state = keep_if_nonfinite(finite, new_state, state)
        metrics = {
            "loss": totals[0] / (k * n),
            "accuracy": totals[1] / (k * n),
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
            "nonfinite": bad.astype(jnp.float32),
            **strategy.step_metrics(ctx, state.extra),
            **noise_metrics,
        }
        return new_state, metrics

    # XLA's CPU backend runs a step inside a rolled loop ~6x slower than alone (digits ResNet-8, k = 8 x 16:
    # 87.9 vs 14.7 ms a step); unrolled, 14.1 ms. Accelerators keep the rolled loop (one step's code).
    unroll = True if layout.devices[0].platform == "cpu" else 1

    def per_device_steps(state: TrainState, images, labels):
        return jax.lax.scan(lambda st, batch: per_device(st, *batch), state, (images, labels), unroll=unroll)

    body, data = (per_device, P(AXIS)) if steps_per_dispatch == 1 else (per_device_steps, P(None, AXIS))

    def step(state, images, labels):
        specs = state_specs(state, strategy)
        fn = jax.shard_map(body, mesh=layout.mesh, in_specs=(specs, data, data), out_specs=(specs, P()), check_vma=False)
        return fn(state, images, labels)

    return jax.jit(step, donate_argnums=0)


def make_eval_step(model, layout: layout_lib.WorkerLayout, strategy: Strategy | None = None):
    """Build the jitted eval step ``(state, images, labels, mask) -> sums``.

    The model is the strategy's evaluation model (the shared copy, or the workers' average) with the BN
    running statistics averaged over the k workers.
    """
    strategy = strategy or Allreduce()

    def per_device(params, stats, images, labels, mask):
        logits = model.apply({"params": params, "batch_stats": stats}, images, train=False)
        ce = grads_lib.cross_entropy(logits, labels)
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        sums = jnp.stack(
            [
                jnp.sum(ce * mask),
                jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
                jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
                jnp.sum(mask),
            ]
        )
        return jax.lax.psum(sums, AXIS)

    def step(state: TrainState, images, labels, mask, model_name: str = ""):
        if model_name:
            params = strategy.extra_eval_params(model_name, state.params, state.extra)
        else:
            params = strategy.eval_params(state.params, state.extra)
        stats = mixing.worker_mean(state.batch_stats)
        fn = jax.shard_map(
            per_device, mesh=layout.mesh, in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS)), out_specs=P(), check_vma=False
        )
        return fn(params, stats, images, labels, mask)

    return jax.jit(step, static_argnames="model_name")


def make_consensus_fn(strategy: Strategy):
    """``state -> consensus distance`` (mean_i ‖x_i − x̄‖² / ‖x̄‖²; 0 for one shared copy), jitted."""

    def distance(state: TrainState):
        workers = strategy.worker_params(state.params, state.extra)
        return jnp.zeros((), jnp.float32) if workers is None else mixing.consensus_distance(workers)

    return jax.jit(distance)
