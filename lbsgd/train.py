"""Training and evaluation in Goyal et al.'s terms: k workers x n examples, one step at a time.

The train step, per device (``jax.shard_map`` over the 1-D device mesh, pmap semantics):

1. the strategy says at which parameters each worker takes its gradient (``lbsgd.strategies``:
   the shared copy for allreduce, each worker's own copy for decentralized strategies);
2. forward each of the device's m = k/d workers on its own n examples (``vmap`` over workers), so
   every worker's BatchNorm statistics come from exactly its n examples (§2.3, never synced);
3. loss of a worker = Σ its per-example cross-entropy / (k·n) when gradients are summed (Remark 3),
   / n when each worker steps alone; gradients optionally accumulated over ``accumulation_steps``
   microsteps, each holding whole workers, so the result is unchanged;
4. the strategy combines: allreduce sums the gradients over devices (``config.aggregation``: psum,
   ring or halving/doubling, §4) and takes one optimizer step (``lbsgd.optim``); D-PSGD and gossip
   take each worker's own optimizer step and average with neighbours.

Each worker keeps its own BatchNorm running statistics (a leading worker axis, sharded over the
mesh); evaluation uses their average over the k workers and the strategy's evaluation model.
The loop (``train_and_evaluate``) is four named pieces: ``setup``, ``restore_or_init``, ``train_loop``
and ``write_results``; it never names a strategy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from lbsgd import checkpoint, optim, strategies
from lbsgd import noise_scale as noise_scale_lib
from lbsgd.models import resnet
from lbsgd.parallel import mixing
from lbsgd.parallel import layout as layout_lib
from lbsgd.parallel.layout import AXIS
from lbsgd.strategies import allreduce

log = logging.getLogger("lbsgd")


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue.

    ``params``/``opt_state`` are one shared copy (allreduce) or per worker with a leading axis of size k
    (decentralized strategies); ``batch_stats`` always have the leading worker axis (each worker's own
    BN running statistics); ``extra`` is the strategy's own state (e.g. push-sum weights);
    ``nonfinite`` counts steps whose loss or gradients were not finite: [in total, consecutively now];
    ``noise`` is the gradient noise scale's moving average (``lbsgd.noise_scale``; empty when off).
    """

    step: jax.Array
    params: Any
    batch_stats: Any  # every leaf has a leading axis of size k (one set of running statistics per worker)
    opt_state: Any
    extra: Any = flax.struct.field(default_factory=dict)
    nonfinite: Any = flax.struct.field(default_factory=lambda: jnp.zeros(2, jnp.int32))
    noise: Any = flax.struct.field(default_factory=dict)


def state_specs(state: TrainState, strategy: strategies.Strategy | None = None) -> TrainState:
    """PartitionSpecs: per-worker leaves (BN statistics, and what the strategy makes per worker) split
    over devices by worker, everything else replicated."""
    strategy = strategy or allreduce.Allreduce()
    params, opt_state, extra = strategy.specs(state.params, state.opt_state, state.extra)
    return TrainState(
        step=P(),
        params=params,
        batch_stats=jax.tree.map(lambda _: P(AXIS), state.batch_stats),
        opt_state=opt_state,
        extra=extra,
        nonfinite=P(),
        noise=jax.tree.map(lambda _: P(), state.noise),
    )


def create_train_state(
    model,
    tx,
    layout: layout_lib.WorkerLayout,
    image_shape,
    seed: int,
    strategy: strategies.Strategy | None = None,
    noise_scale: bool = False,
) -> TrainState:
    """Initialise parameters from ``seed`` and place the state on the mesh (same values for any layout).

    Every worker starts from the same parameters; ``strategy`` (default allreduce) decides whether they
    are one shared copy or k copies. ``noise_scale``: carry the gradient noise scale's moving average
    (for a step built with ``make_train_step(noise_scale=True)``).
    """
    k = layout.num_workers
    strategy = strategy or allreduce.Allreduce()

    def init():
        variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *image_shape), jnp.float32), train=False)
        params, opt_state, extra = strategy.init(variables["params"], tx, k)
        stats = jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *x.shape)), variables.get("batch_stats", {}))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=stats,
            opt_state=opt_state,
            extra=extra,
            noise=noise_scale_lib.init() if noise_scale else {},
        )

    abstract = jax.eval_shape(init)
    shardings = jax.tree.map(layout.sharding, state_specs(abstract, strategy))
    return run_once(init, out_shardings=shardings, platform=layout.devices[0].platform)


def run_once(fn, out_shardings=None, platform: str | None = None):
    """Compile ``fn`` (no arguments; e.g. a model's ``init``) with ``init_compiler_options`` for
    ``platform`` (default: JAX's default backend) and run it once."""
    lowered = jax.jit(fn, out_shardings=out_shardings).lower()
    return lowered.compile(compiler_options=init_compiler_options(platform or jax.default_backend()))()


INIT_CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def init_compiler_options(platform: str) -> dict:
    """XLA options for the one-off initialisation program: LLVM level 1 instead of 2 on CPU.

    The initialisers' threefry draws dominate that program, and XLA's CPU backend compiles them
    3-4x faster at level 1 (ResNet-8: 3.5 -> 0.9 s; ResNet-50: 7.3 -> 4.3 s) to bitwise the same
    values (``tests/test_train.py`` checks it); the program runs once, so its speed does not matter.
    Other platforms keep their defaults.
    """
    return dict(INIT_CPU_COMPILER_OPTIONS) if platform == "cpu" else {}


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels."""
    num_classes = logits.shape[-1]
    targets = (
        optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
        if label_smoothing
        else jax.nn.one_hot(labels, num_classes)
    )
    return optax.softmax_cross_entropy(logits, targets)


def make_train_step(
    model,
    tx,
    schedule,
    layout: layout_lib.WorkerLayout,
    *,
    per_worker_batch_size: int,
    strategy: strategies.Strategy | None = None,
    accumulation_steps: int = 1,
    label_smoothing: float = 0.0,
    skip_nonfinite: bool = False,
    noise_scale: bool = False,
    noise_scale_decay: float = noise_scale_lib.DEFAULT_DECAY,
):
    """Build the jitted train step ``(state, images, labels) -> (state, metrics)``.

    ``images``/``labels`` are global arrays of k·n examples sharded over the mesh, worker-major
    (worker w's n examples are rows w·n .. w·n+n-1). Per device: the strategy says where each worker
    takes its gradient (``prepare``), every worker computes its loss on its own n examples with its own
    BN statistics (divided by the strategy's denominator: kn for allreduce, Remark 3; n for
    decentralized workers), and the strategy combines the gradients into the new state (``update``).
    Metrics are exact over the kn examples. ``strategy`` defaults to allreduce with ``psum``.

    ``metrics['nonfinite']`` is 1.0 when the loss or any worker's gradient was NaN or infinite (so the
    host learns it with the metrics, no extra sync); ``state.nonfinite`` counts such steps. With
    ``skip_nonfinite`` such a step changes nothing but the step and the counters (every worker skips
    it, like ``optax.apply_if_finite``); without, the caller must stop (``train_loop`` does).

    ``noise_scale`` (allreduce, k >= 2; the state from ``create_train_state(noise_scale=True)``): also
    estimate the gradient noise scale from what the step computes anyway — each worker's gradient over
    its n examples and their sum over kn (``lbsgd.noise_scale``, McCandlish et al. 2018) — and log
    ``noise_scale``, ``noise_g2`` and ``noise_trace``. The device's workers then take their gradients
    one after another (unrolled, so that each one's norm is seen); off, nothing of it is traced and the
    step is the same program as without the argument.
    """
    strategy = strategy or allreduce.Allreduce()
    k, n, m, a = layout.num_workers, per_worker_batch_size, layout.workers_per_device, accumulation_steps
    if m % a:
        raise ValueError(f"config.accumulation_steps={a} must divide the {m} workers per device")
    g = m // a  # workers per microstep
    denominator = strategy.loss_denominator(k, n)
    per_worker = strategy.grad_per_worker  # each worker differentiates at its own parameters
    if noise_scale and not strategy.supports_noise_scale:
        raise ValueError(f"the gradient noise scale needs one shared gradient (strategy 'allreduce'), not {strategy.name!r}")
    if noise_scale and k < 2:
        raise ValueError("the gradient noise scale compares one worker's gradient with k workers' sum: it needs k >= 2")

    def worker_loss(params, stats, x, y):
        """One worker: forward on its n examples with its own BN statistics; loss / (kn) or / n."""
        logits, new_vars = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        ce = cross_entropy(logits, y, label_smoothing)
        correct = jnp.sum(jnp.argmax(logits, -1) == y)
        return jnp.sum(ce) / denominator, (new_vars.get("batch_stats", {}), jnp.sum(ce), correct)

    def group_loss(params, stats, x, y):
        losses, aux = jax.vmap(worker_loss, in_axes=(None, 0, 0, 0))(params, stats, x, y)
        return jnp.sum(losses), aux

    shared_grad_fn = jax.grad(group_loss, has_aux=True)
    worker_grad_fn = jax.grad(worker_loss, has_aux=True)

    def per_worker_grad_fn(params, stats, x, y):
        """Workers with their own parameters, one after another (unrolled). ``vmap`` would batch their
        different kernels into grouped convolutions, whose gradients XLA's CPU backend runs ~15x slower
        than the same convolutions one at a time (measured: ResNet-20, 8 workers, 1.45 s vs 0.095 s)."""
        outs = [worker_grad_fn(*jax.tree.map(lambda t: t[w], (params, stats, x, y))) for w in range(x.shape[0])]
        return jax.tree.map(lambda *t: jnp.stack(t), *outs)

    grad_fn = per_worker_grad_fn if per_worker else shared_grad_fn

    def sq_norm(tree):
        return sum(jnp.sum(jnp.square(t.astype(jnp.float32))) for t in jax.tree.leaves(tree))

    def gradients_and_norms(params, batch_stats, images, labels):
        """Like ``worker_gradients`` (shared parameters), plus Σ over this device's workers of the squared
        norm of each one's gradient: the workers, one after another, add into one sum. Unrolled, as
        ``per_worker_grad_fn``: as a ``lax.scan`` (even of one worker) the step ran ~4x slower on XLA's CPU
        backend (digits ResNet-8 width 16, k = 8 x 16: 95 -> 24 ms on 8 devices, 114 -> 22 ms on 1)."""
        x, y = images.reshape(m, n, *images.shape[1:]), labels.reshape(m, n)
        grads, sq, outs = jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), []
        for w in range(m):
            g_w, aux = worker_grad_fn(params, jax.tree.map(lambda t: t[w], batch_stats), x[w], y[w])
            grads, sq = jax.tree.map(jnp.add, grads, g_w), sq + sq_norm(g_w)
            outs.append(aux)
        new_stats, ce, correct = jax.tree.map(lambda *t: jnp.stack(t), *outs)
        return grads, new_stats, jnp.sum(ce), jnp.sum(correct), sq

    def worker_gradients(params, batch_stats, images, labels):
        """Gradients of this device's m workers (summed if shared, one per worker if per worker), new BN
        statistics, and the summed cross-entropy and correct count; in ``a`` microsteps of whole workers."""
        split = lambda t: t.reshape(a, g, *t.shape[1:])  # noqa: E731 - [m,...] -> [a, m/a, ...]
        x = images.reshape(a, g, n, *images.shape[1:])
        y = labels.reshape(a, g, n)
        stats = jax.tree.map(split, batch_stats)
        if a == 1:
            grads, (new_stats, ce_sum, correct) = grad_fn(params, *jax.tree.map(lambda t: t[0], (stats, x, y)))
            new_stats = jax.tree.map(lambda t: t[None], new_stats)
        elif per_worker:

            def microstep(_, inputs):
                grads, (st, ce, c) = grad_fn(*inputs)
                return None, (grads, st, jnp.sum(ce), jnp.sum(c))

            _, (grads, new_stats, ce_sum, correct) = jax.lax.scan(
                microstep, None, (jax.tree.map(split, params), stats, x, y)
            )
            grads = jax.tree.map(lambda t: t.reshape(m, *t.shape[2:]), grads)
        else:

            def microstep(acc, inputs):
                grads, (st, ce, c) = grad_fn(params, *inputs)
                return jax.tree.map(jnp.add, acc, grads), (st, jnp.sum(ce), jnp.sum(c))

            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, (new_stats, ce_sum, correct) = jax.lax.scan(microstep, zeros, (stats, x, y))
        new_stats = jax.tree.map(lambda t: t.reshape(m, *t.shape[2:]), new_stats)
        return grads, new_stats, jnp.sum(ce_sum), jnp.sum(correct)

    def per_device(state: TrainState, images, labels):
        ctx = strategies.StepContext(
            axis=AXIS, num_workers=k, num_devices=layout.num_devices, workers_per_device=m, step=state.step
        )
        grad_params = strategy.prepare(ctx, state.params, state.extra)
        noise_metrics, noise = {}, state.noise
        if noise_scale:
            grads, new_stats, ce_sum, correct, sq = gradients_and_norms(grad_params, state.batch_stats, images, labels)
            summed = strategy.reduce(ctx, grads)  # G_kn: the gradient the step is taken on
            params, opt_state, extra = strategy.apply(ctx, tx, state.params, state.opt_state, state.extra, summed)
        else:
            grads, new_stats, ce_sum, correct = worker_gradients(grad_params, state.batch_stats, images, labels)
            params, opt_state, extra = strategy.update(
                ctx, tx, state.params, state.opt_state, state.extra, grad_params, grads
            )
        local_ok = jnp.isfinite(ce_sum) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(t)) for t in jax.tree.leaves(grads)]))
        sums = [ce_sum, correct.astype(jnp.float32), 1.0 - local_ok] + ([sq] if noise_scale else [])
        totals = jax.lax.psum(jnp.stack(sums), AXIS)
        finite = totals[2] == 0
        if noise_scale:
            # Worker w's loss is Σ ce / (kn), so its gradient g_w is 1/k of the gradient of its mean loss
            # G_n,w: the mean over workers of |G_n,w|² is k Σ_w |g_w|²; G_kn = Σ_w g_w (Remark 3).
            small_sq, big_sq = k * totals[3], sq_norm(summed)
            noise = noise_scale_lib.update(state.noise, small_sq, big_sq, n, k * n, noise_scale_decay)
            noise_metrics = noise_scale_lib.read(noise)
        if skip_nonfinite:  # keep the old state (every device decides alike: the flag is psummed)
            keep = lambda new, old: jax.tree.map(lambda a_, b_: jnp.where(finite, a_, b_), new, old)  # noqa: E731
            params, opt_state, extra, new_stats, noise = keep(
                (params, opt_state, extra, new_stats, noise),
                (state.params, state.opt_state, state.extra, state.batch_stats, state.noise),
            )
        bad = 1 - finite.astype(jnp.int32)
        nonfinite = jnp.stack([state.nonfinite[0] + bad, (state.nonfinite[1] + 1) * bad])
        metrics = {
            "loss": totals[0] / (k * n),
            "accuracy": totals[1] / (k * n),
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
            "nonfinite": bad.astype(jnp.float32),
            **strategy.step_metrics(ctx, state.extra),
            **noise_metrics,
        }
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            batch_stats=new_stats,
            opt_state=opt_state,
            extra=extra,
            nonfinite=nonfinite,
            noise=noise,
        )
        return new_state, metrics

    def step(state, images, labels):
        specs = state_specs(state, strategy)
        fn = jax.shard_map(
            per_device, mesh=layout.mesh, in_specs=(specs, P(AXIS), P(AXIS)), out_specs=(specs, P()), check_vma=False
        )
        return fn(state, images, labels)

    return jax.jit(step, donate_argnums=0)


def make_eval_step(model, layout: layout_lib.WorkerLayout, strategy: strategies.Strategy | None = None):
    """Build the jitted eval step ``(state, images, labels, mask) -> sums``.

    The model is the strategy's evaluation model (the shared copy, or the workers' average) with the BN
    running statistics averaged over the k workers.
    """
    strategy = strategy or allreduce.Allreduce()

    def per_device(params, stats, images, labels, mask):
        logits = model.apply({"params": params, "batch_stats": stats}, images, train=False)
        ce = cross_entropy(logits, labels)
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


def make_consensus_fn(strategy: strategies.Strategy):
    """``state -> consensus distance`` (mean_i ‖x_i − x̄‖² / ‖x̄‖²; 0 for one shared copy), jitted."""

    def distance(state: TrainState):
        workers = strategy.worker_params(state.params, state.extra)
        return jnp.zeros((), jnp.float32) if workers is None else mixing.consensus_distance(workers)

    return jax.jit(distance)


def _one_model(state: TrainState, strategy: strategies.Strategy):
    """(shape, itemsize) of each leaf of one worker's parameters (the leading worker axis dropped)."""
    drop = 1 if strategy.per_worker else 0
    return [(x.shape[drop:], x.dtype.itemsize) for x in jax.tree.leaves(state.params)]


def num_parameters(state: TrainState, strategy: strategies.Strategy) -> int:
    """Parameters of one model (one worker's copy)."""
    return sum(int(np.prod(shape)) for shape, _ in _one_model(state, strategy))


def model_bytes(state: TrainState, strategy: strategies.Strategy) -> int:
    """Bytes of one worker's parameters (what a worker sends when it sends its model)."""
    return sum(int(np.prod(shape)) * size for shape, size in _one_model(state, strategy))


def global_batch(layout: layout_lib.WorkerLayout, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assemble this process's rows into global arrays sharded over the mesh (worker-major)."""
    sharding = layout.sharding(P(AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def evaluate(eval_step, state, dataset, layout, config, model_name: str = "") -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy over every evaluation example exactly once.

    ``model_name`` picks one of the strategy's ``extra_eval_params`` instead of its evaluation model."""
    from lbsgd.data import pipeline

    d = layout.num_devices
    per_device = max(1, -(-config.eval_batch_size // d))
    global_size = per_device * d
    local_slots = per_device * len(layout.local_device_positions)
    first = layout.local_device_positions[0] * per_device
    totals = np.zeros(4, np.float64)
    for batch in pipeline.eval_iterator(
        dataset,
        global_batch_size=global_size,
        first_slot=first,
        num_local_slots=local_slots,
        augment=config.augment,
        image_size=config.image_size,
    ):
        b = global_batch(layout, batch)
        sums = eval_step(state, b["image"], b["label"], b["mask"], model_name=model_name)
        totals += np.asarray(jax.device_get(sums), np.float64)
    count = totals[3]
    return {
        "eval_loss": totals[0] / count,
        "eval_accuracy": totals[1] / count,
        "eval_top5_accuracy": totals[2] / count,
        "eval_examples": count,
    }


def resolve_accumulation(
    workers_per_device: int, per_worker_batch_size: int, accumulation_steps: int, max_device_batch: int = 0
) -> int:
    """Microsteps per step for m workers of n examples on one device.

    ``accumulation_steps > 0`` is taken as given. ``0`` means automatic: the fewest microsteps a
    (a divisor of m, so every microstep holds whole workers) with (m/a)·n ≤ ``max_device_batch``
    examples; 1 when ``max_device_batch`` is 0 (no limit). A worker's n examples always stay in one
    microstep, so its BN statistics never change; gradients are summed over microsteps.
    """
    if accumulation_steps > 0:
        return accumulation_steps
    if max_device_batch <= 0:
        return 1
    for a in range(1, workers_per_device + 1):
        if workers_per_device % a == 0 and (workers_per_device // a) * per_worker_batch_size <= max_device_batch:
            return a
    return workers_per_device  # one worker per microstep: the least memory possible


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def build_model(config, num_classes: int):
    """The model named by ``config.model`` at ``config.dtype``."""
    return resnet.create_model(
        config.model,
        num_classes=num_classes,
        dtype=_dtype(config.dtype),
        width=config.get("model_width") or None,
        stem=config.get("model_stem") or None,
    )


class Interrupted(Exception):
    """Training stopped on a signal after checkpointing; ``str(e)`` says where and how to resume."""

    def __init__(self, signum: int, step: int, checkpoint_dir: str):
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} after step {step}; checkpoint saved in {checkpoint_dir}; "
            f"rerun the same command to resume"
        )


NONFINITE_POLICIES = ("stop", "skip")  # config.on_nonfinite


class NonFinite(Exception):
    """The loss or a gradient became NaN or infinite; the state after it was not saved."""

    exit_code = 3

    def __init__(self, step: int, how: str):
        self.step = step
        self.how = how
        super().__init__(f"non-finite loss or gradient at step {step} ({how})")


def check_nonfinite(pending: list, state: TrainState, config) -> None:
    """Look at the ``nonfinite`` flags of the steps since the last check (fetched with the metrics).

    ``config.on_nonfinite='stop'``: raise ``NonFinite`` naming the first bad step. ``'skip'``: the step
    already kept the old state; log it, and raise once ``config.max_consecutive_nonfinite`` steps in a
    row were skipped. ``pending`` holds ``(step, flag)`` pairs and is emptied.
    """
    if not pending:
        return
    flags = jax.device_get([flag for _, flag in pending])
    bad = [step for (step, _), flag in zip(pending, flags) if float(flag) > 0]
    pending.clear()
    if not bad:
        return
    if config.get("on_nonfinite", "stop") == "stop":
        raise NonFinite(bad[0], "config.on_nonfinite='stop'")
    total, consecutive = (int(v) for v in jax.device_get(state.nonfinite))
    log.warning("non-finite loss or gradient at step(s) %s: update skipped (%d skipped in total)", bad, total)
    limit = config.get("max_consecutive_nonfinite", 10)
    if consecutive >= limit:
        raise NonFinite(bad[-1], f"{consecutive} consecutive steps skipped, config.max_consecutive_nonfinite={limit}")


class _StopOnSignal:
    """First SIGTERM or SIGINT: finish the current step, checkpoint, stop (a second Ctrl-C stops at once).

    Single-process runs only: with several processes the hosts must stop at the same step, which JAX's
    preemption sync point (``CheckpointManager.reached_preemption``) arranges instead.
    """

    def __init__(self, enabled: bool):
        self.signum = None
        self._previous = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: stopping after this step with a checkpoint", signal.Signals(signum).name)

    def restore(self) -> None:
        """Put the previous signal handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _blocking_needed() -> bool:
    # Measured hazard: on the CPU backend, a step with collectives dispatched while the previous one is
    # still running can abort the process (rendezvous timeout). Blocking on every step avoids it.
    return jax.default_backend() == "cpu"


@dataclasses.dataclass
class Run:
    """What ``setup`` builds for a run: data, model, optimizer, strategy, layout, writer and step counts."""

    config: Any
    workdir: str
    layout: layout_lib.WorkerLayout
    dataset: Any
    steps_per_epoch: int
    total_steps: int
    model: Any
    tx: Any
    schedule: Any
    strategy: strategies.Strategy
    writer: Any
    is_chief: bool
    accumulation: int
    t_start: float
    target_reached_s: float | None = None  # seconds from t_start to the first eval >= config.target_accuracy

    @property
    def checkpoint_dir(self) -> str:
        """``WORKDIR/checkpoints`` (absolute)."""
        return checkpoint.checkpoint_dir(self.workdir)


def _load_dataset(config):
    """Load (and on first use prepare) the dataset; with several processes the chief prepares it first."""
    from jax.experimental import multihost_utils

    from lbsgd.data import pipeline

    is_chief = jax.process_index() == 0
    dataset = pipeline.load(config.dataset, config.data_dir) if is_chief or jax.process_count() == 1 else None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dataset prepared")
        if not is_chief:
            dataset = pipeline.load(config.dataset, config.data_dir)
    return dataset


def setup(config, workdir: str) -> Run:
    """Layout, dataset, schedule, optimizer, model, strategy and metric writer for ``config``."""
    from clu import metric_writers

    from lbsgd import validate
    from lbsgd.data import order

    t_start = time.time()
    is_chief = jax.process_index() == 0
    layout = layout_lib.make_layout(config.num_workers, config.num_devices)
    dataset = _load_dataset(config)
    validate.check_dataset(config, dataset.train.num_examples)
    kn = config.num_workers * config.per_worker_batch_size
    spe = order.steps_per_epoch(dataset.train.num_examples, kn)
    total_steps = config.num_epochs * spe
    if config.max_steps > 0:
        total_steps = min(total_steps, config.max_steps)
    tx, schedule = optim.from_config(config, spe)
    # Only process 0 writes metrics (events and log lines); the others stay quiet.
    writer = (
        metric_writers.create_default_writer(workdir, asynchronous=False) if is_chief else metric_writers.MultiWriter([])
    )
    accumulation = resolve_accumulation(
        layout.workers_per_device, config.per_worker_batch_size, config.accumulation_steps, config.get("max_device_batch", 0)
    )
    return Run(
        config=config,
        workdir=workdir,
        layout=layout,
        dataset=dataset,
        steps_per_epoch=spe,
        total_steps=total_steps,
        model=build_model(config, dataset.num_classes),
        tx=tx,
        schedule=schedule,
        strategy=strategies.from_config(config, layout.num_devices),
        writer=writer,
        is_chief=is_chief,
        accumulation=accumulation,
        t_start=t_start,
    )


def restore_or_init(run: Run, mngr) -> TrainState:
    """A fresh state from ``config.seed``, or the newest intact checkpoint of the workdir when there is one
    (``checkpoint.restore_latest``: a damaged newest one is moved aside with a warning)."""
    config = run.config
    image_shape = (config.image_size, config.image_size, run.dataset.channels)
    state = create_train_state(
        run.model, run.tx, run.layout, image_shape, config.seed, run.strategy, noise_scale=config.get("noise_scale", False)
    )
    k, n, lay = config.num_workers, config.per_worker_batch_size, run.layout
    log.info(
        "model %s: %s parameters; k=%d workers x n=%d = %d per step on %d devices (%d processes), "
        "%d workers/device; strategy %s (%.3g MB sent per worker per step); %d steps/epoch, %d steps",
        config.model,
        f"{num_parameters(state, run.strategy):,}",
        k,
        n,
        k * n,
        lay.num_devices,
        lay.num_processes,
        lay.workers_per_device,
        " ".join(f"{key}={value}" for key, value in run.strategy.describe().items()),
        run.strategy.bytes_sent_per_worker_per_step(k, model_bytes(state, run.strategy)) / 1e6,
        run.steps_per_epoch,
        run.total_steps,
    )
    if run.accumulation > 1:
        g = lay.workers_per_device // run.accumulation
        log.info(
            "%d workers per device run in %d accumulation microsteps of %d workers (%d examples)",
            lay.workers_per_device,
            run.accumulation,
            g,
            g * n,
        )
    if mngr.all_steps():
        import orbax.checkpoint as ocp
        from jax.experimental import multihost_utils

        barrier = (lambda: multihost_utils.sync_global_devices("checkpoint fallback")) if lay.num_processes > 1 else None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = checkpoint.restore_latest(mngr, run.workdir, abstract, run.is_chief, barrier)
        if restored is not None:
            state = restored
            log.info("resumed from checkpoint at step %d", int(state.step))
    return state


@dataclasses.dataclass
class LoopResult:
    """What the loop leaves for results.json."""

    state: TrainState
    last_metrics: dict | None
    eval_metrics: dict | None
    train_time: float  # from the end of the first step (which includes compilation) to the end
    timed_steps: int
    startup_s: float = 0.0  # from the start of ``setup`` to the first step's dispatch
    compile_s: float = 0.0  # the first step: compilation (or a cache load) and one step


def evaluate_run(run: Run, eval_step, consensus_fn, state, step: int) -> dict[str, float]:
    """Evaluate, add the consensus distance, write them at ``step`` and log one line."""
    metrics = evaluate(eval_step, state, run.dataset, run.layout, run.config)
    metrics["consensus_distance"] = float(jax.device_get(consensus_fn(state)))
    target = run.config.get("target_accuracy", 0.0)
    if target and run.target_reached_s is None and metrics["eval_accuracy"] >= target:
        run.target_reached_s = time.time() - run.t_start
    for name in run.strategy.extra_eval_models:
        other = evaluate(eval_step, state, run.dataset, run.layout, run.config, model_name=name)
        metrics.update({f"{key}_{name}": value for key, value in other.items() if key != "eval_examples"})
    run.writer.write_scalars(step, metrics)
    if run.is_chief:  # one line per evaluation, kept across resumes (a reader keeps the last line per step)
        with open(os.path.join(run.workdir, "eval_history.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "epoch": step / run.steps_per_epoch, **metrics}) + "\n")
    log.info(
        "step %d/%d (epoch %.2f): eval accuracy %.4f, loss %.4f, consensus distance %.3g",
        step,
        run.total_steps,
        step / run.steps_per_epoch,
        metrics["eval_accuracy"],
        metrics["eval_loss"],
        metrics["consensus_distance"],
    )
    return metrics


def record_epoch(run: Run, step: int, metrics: list[dict]) -> None:
    """Append the mean training metrics of the steps since the last epoch boundary (``metrics``; after a
    resume, those run since it) to ``WORKDIR/train_history.jsonl`` (chief only; a reader keeps the last
    line per step)."""
    if not run.is_chief or not metrics:
        return
    values = jax.device_get(metrics)
    row = {"step": step, "epoch": step / run.steps_per_epoch, "steps_averaged": len(values)}
    row.update({f"train_{key}": float(np.mean([float(m[key]) for m in values])) for key in values[0]})
    row.update({f"last_{key}": float(values[-1][key]) for key in values[0] if key.startswith("noise_")})
    with open(os.path.join(run.workdir, "train_history.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def train_loop(run: Run, state: TrainState, mngr, train_step, eval_step, consensus_fn) -> LoopResult:
    """Steps from ``state.step`` to the end: train, log, evaluate, checkpoint, stop cleanly on a signal.

    Whenever the host reads the device anyway (logging, evaluation, checkpointing, the end, a stop), it
    first checks the steps' non-finite flags (``check_nonfinite``), so a non-finite state is never
    evaluated or saved.
    """
    from clu import periodic_actions

    from lbsgd.data import pipeline

    config, lay, writer = run.config, run.layout, run.writer
    start_step, total_steps = int(state.step), run.total_steps
    batches = pipeline.train_iterator(
        run.dataset,
        num_workers=config.num_workers,
        per_worker_batch_size=config.per_worker_batch_size,
        seed=config.seed,
        first_worker=lay.first_worker,
        num_local_workers=lay.local_workers,
        start_step=start_step,
        augment=config.augment,
        image_size=config.image_size,
        num_steps=total_steps - start_step,
    )
    hooks = []
    bar = None
    if run.is_chief:
        hooks.append(
            periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps)
        )
        if sys.stdout.isatty():
            import tqdm

            bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
    spe = run.steps_per_epoch
    eval_every = max(1, int(config.eval_every_epochs * spe)) if config.eval_every_epochs > 0 else 0
    block = _blocking_needed()
    window, epoch_window, last_metrics, eval_metrics = [], [], None, None
    t_train, timed_steps = None, 0
    stop = _StopOnSignal(enabled=lay.num_processes == 1)
    last_saved = start_step
    pending = []  # (step, non-finite flag) not yet looked at
    t_first = time.time()
    try:
        for step in range(start_step, total_steps):
            b = global_batch(lay, next(batches))
            state, metrics = train_step(state, b["image"], b["label"])
            if block:
                jax.block_until_ready(state)
            window.append(metrics)
            epoch_window.append(metrics)
            pending.append((step + 1, metrics["nonfinite"]))
            if t_train is None:  # the first step includes compilation: time from its end
                jax.block_until_ready(metrics)
                t_train = time.time()
            else:
                timed_steps += 1
            done = step + 1
            for h in hooks:
                h(done)
            if bar is not None:
                bar.update(1)
            evaluate_now = (eval_every and done % eval_every == 0) or done == total_steps
            save_now = done % config.checkpoint_every_steps == 0 or done == total_steps
            preempted = stop.signum is not None or (lay.num_processes > 1 and mngr.reached_preemption(done))
            epoch_end = done % spe == 0 or done == total_steps
            if evaluate_now or save_now or preempted or epoch_end or done % config.log_every_steps == 0:
                check_nonfinite(pending, state, config)
            if epoch_end:
                record_epoch(run, done, epoch_window)
                epoch_window = []
            if done % config.log_every_steps == 0 or done == total_steps:
                means = {k_: float(np.mean([float(m_[k_]) for m_ in jax.device_get(window)])) for k_ in window[0]}
                last_metrics = jax.device_get(metrics)
                writer.write_scalars(done, {f"train_{k_}": v for k_, v in means.items()})
                if bar is not None:
                    bar.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{means['accuracy']:.3f}")
                window = []
            if evaluate_now:
                eval_metrics = evaluate_run(run, eval_step, consensus_fn, state, done)
            if save_now:
                checkpoint.save(mngr, done, state)
                last_saved = done
            if preempted and done < total_steps:
                if last_saved != done:
                    checkpoint.save(mngr, done, state, force=True)
                mngr.wait_until_finished()
                raise Interrupted(stop.signum or signal.SIGTERM, done, run.checkpoint_dir)
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        writer.flush()
    train_time = (time.time() - t_train) if t_train is not None else 0.0
    compile_s = (t_train - t_first) if t_train is not None else 0.0
    return LoopResult(state, last_metrics, eval_metrics, train_time, timed_steps, t_first - run.t_start, compile_s)


def noise_results(state: TrainState) -> dict[str, float | None]:
    """results.json's ``noise_scale`` (B_simple, in examples), ``noise_g2`` and ``noise_trace`` at the end
    of training (their moving averages) and ``noise_scale_run`` (averaged over the whole run); None when
    the run did not estimate them."""
    if not state.noise:
        return {"noise_scale": None, "noise_g2": None, "noise_trace": None, "noise_scale_run": None}
    return {key: float(value) for key, value in jax.device_get(noise_scale_lib.read(state.noise)).items()}


def previous_train_metrics(workdir: str, step: int) -> dict[str, Any]:
    """The last step's training metrics as ``WORKDIR/results.json`` recorded them when the run reached
    ``step`` (a finished run started again has no step of its own to report); ``{}`` when that file is
    missing, unreadable or from another step (results.json then has ``train_loss: null``)."""
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(old, dict) or old.get("steps") != step:
        return {}
    metrics = {key[len("train_"):]: value for key, value in old.items() if key.startswith("train_")}
    metrics.pop("s", None)  # train_s: the time, not a step metric
    return metrics


def _float_or_none(value) -> float | None:
    return None if value is None else float(value)


def write_results(run: Run, result: LoopResult, eval_step, consensus_fn) -> dict[str, Any]:
    """The final results (evaluating the state if the loop had nothing left to do); the chief writes
    ``WORKDIR/results.json`` atomically."""
    config, lay, state = run.config, run.layout, result.state
    eval_metrics = result.eval_metrics
    if eval_metrics is None:  # nothing left to train (resumed a finished run): evaluate the final state
        eval_metrics = evaluate_run(run, eval_step, consensus_fn, state, int(state.step))
    last_metrics = result.last_metrics
    if last_metrics is None:  # no step ran here: the training figures are those of the run that ended here
        last_metrics = previous_train_metrics(run.workdir, int(state.step))
    k, n = config.num_workers, config.per_worker_batch_size
    kn = k * n
    results = {
        "eval_accuracy": float(eval_metrics["eval_accuracy"]),
        "eval_loss": float(eval_metrics["eval_loss"]),
        "eval_top1_error": 1.0 - float(eval_metrics["eval_accuracy"]),
        "eval_top5_error": 1.0 - float(eval_metrics["eval_top5_accuracy"]),
        "eval_examples": int(eval_metrics["eval_examples"]),
        "train_loss": _float_or_none(last_metrics.get("loss")),  # loss of the last step, over its kn examples
        "steps": int(state.step),
        "epochs": int(state.step) / run.steps_per_epoch,
        "global_batch_size": kn,
        "num_workers": k,
        "per_worker_batch_size": n,
        "devices": lay.num_devices,
        "processes": lay.num_processes,
        "workers_per_device": lay.workers_per_device,
        "accumulation_steps": run.accumulation,
        **run.strategy.describe(),
        "consensus_distance": float(eval_metrics["consensus_distance"]),
        **{key: float(value) for key, value in eval_metrics.items() if key.endswith(run.strategy.extra_eval_models)},
        **{
            f"train_{key}": float(value)
            for key, value in last_metrics.items()
            if key not in ("loss", "accuracy", "learning_rate", "nonfinite") and not key.startswith("noise_")
        },
        **noise_results(state),
        "lr_scaling": config.get("lr_scaling", "linear"),
        "peak_learning_rate": optim.peak_learning_rate(config),
        "bytes_sent_per_worker_per_step": float(
            run.strategy.bytes_sent_per_worker_per_step(k, model_bytes(state, run.strategy))
        ),
        "num_params": num_parameters(state, run.strategy),
        "nonfinite_steps_skipped": int(jax.device_get(state.nonfinite)[0]),
        "wall_time_s": time.time() - run.t_start,
        "startup_s": result.startup_s,
        "compile_s": result.compile_s,
        "train_s": result.train_time,
        "seconds_to_target": run.target_reached_s,  # null: no target set, or not reached
        "images_per_second": (result.timed_steps * kn / result.train_time) if result.train_time > 0 else 0.0,
        "backend": jax.default_backend(),
    }
    if run.is_chief:
        path = os.path.join(run.workdir, "results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(path + ".tmp", path)
        log.info("results: %s", json.dumps(results))
    return results


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Train ``config`` in ``workdir`` (resuming from its latest intact checkpoint) and return results.json's
    dict.

    Before anything is compiled, a workdir with checkpoints is checked against the config it recorded
    (``checkpoint.check_resume``: ``CheckpointError`` if the state or data order would differ). Raises
    ``NonFinite`` (after committing the saves in flight) when training produced a non-finite value.
    """
    changed = checkpoint.check_resume(workdir, config)
    if changed:
        log.info("resuming with changed config fields: %s", ", ".join(f"{k_} {a!r} -> {b!r}" for k_, (a, b) in changed.items()))
    run = setup(config, workdir)
    if run.is_chief:
        checkpoint.record_config(workdir, config)
    run.writer.write_hparams({k_: v for k_, v in config.items() if isinstance(v, (int, float, str, bool))})
    mngr = checkpoint.manager(workdir)
    state = restore_or_init(run, mngr)
    train_step = make_train_step(
        run.model,
        run.tx,
        run.schedule,
        run.layout,
        per_worker_batch_size=config.per_worker_batch_size,
        strategy=run.strategy,
        accumulation_steps=run.accumulation,
        label_smoothing=config.label_smoothing,
        skip_nonfinite=config.get("on_nonfinite", "stop") == "skip",
        noise_scale=config.get("noise_scale", False),
        noise_scale_decay=config.get("noise_scale_decay", noise_scale_lib.DEFAULT_DECAY),
    )
    eval_step = make_eval_step(run.model, run.layout, run.strategy)
    consensus_fn = make_consensus_fn(run.strategy)
    try:
        result = train_loop(run, state, mngr, train_step, eval_step, consensus_fn)
    except NonFinite as e:
        mngr.wait_until_finished()  # the good checkpoints in flight are committed; the bad state never saved
        raise NonFinite(
            e.step, f"{e.how}; the state after it was not saved; last good checkpoint: {checkpoint.describe_latest(workdir)}"
        ) from None
    mngr.wait_until_finished()
    results = write_results(run, result, eval_step, consensus_fn)
    mngr.close()
    run.writer.flush()
    return results
