"""Training and evaluation in Goyal et al.'s terms: k workers x n examples, one step at a time.

The train step, per device (``jax.shard_map`` over the 1-D device mesh, pmap semantics):

1. forward each of the device's m = k/d workers on its own n examples (``vmap`` over workers), so
   every worker's BatchNorm statistics come from exactly its n examples (§2.3, never synced);
2. loss of a worker = Σ its per-example cross-entropy / (k·n) (Remark 3), gradient of the sum of
   the local workers' losses (optionally accumulated over ``accumulation_steps`` microsteps, each
   holding whole workers, so the result is unchanged);
3. sum the gradients over devices (``config.aggregation``: psum, ring or halving/doubling, §4);
4. the optimizer update (``lbsgd.optim``), identical on every device.

Each worker keeps its own BatchNorm running statistics (a leading worker axis, sharded over the
mesh); evaluation uses their average over the k workers.
"""

from __future__ import annotations

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

from lbsgd import optim
from lbsgd.models import resnet
from lbsgd.parallel import aggregators
from lbsgd.parallel import layout as layout_lib
from lbsgd.parallel.layout import AXIS

log = logging.getLogger("lbsgd")


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: step, shared parameters, per-worker BN statistics, optimizer."""

    step: jax.Array
    params: Any
    batch_stats: Any  # every leaf has a leading axis of size k (one set of running statistics per worker)
    opt_state: Any


def state_specs(state: TrainState) -> TrainState:
    """PartitionSpecs: BN statistics split over devices by worker, everything else replicated."""
    return TrainState(
        step=P(),
        params=jax.tree.map(lambda _: P(), state.params),
        batch_stats=jax.tree.map(lambda _: P(AXIS), state.batch_stats),
        opt_state=jax.tree.map(lambda _: P(), state.opt_state),
    )


def create_train_state(model, tx, layout: layout_lib.WorkerLayout, image_shape, seed: int) -> TrainState:
    """Initialise parameters from ``seed`` and place the state on the mesh (same values for any layout)."""
    k = layout.num_workers

    def init():
        variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *image_shape), jnp.float32), train=False)
        params = variables["params"]
        stats = jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *x.shape)), variables.get("batch_stats", {}))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats, opt_state=tx.init(params))

    abstract = jax.eval_shape(init)
    shardings = jax.tree.map(layout.sharding, state_specs(abstract))
    return jax.jit(init, out_shardings=shardings)()


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
    aggregation: str = "psum",
    bucket_mb: float = 25.0,
    accumulation_steps: int = 1,
    label_smoothing: float = 0.0,
):
    """Build the jitted train step ``(state, images, labels) -> (state, metrics)``.

    ``images``/``labels`` are global arrays of k·n examples sharded over the mesh, worker-major
    (worker w's n examples are rows w·n .. w·n+n-1). Metrics are exact over the kn examples.
    """
    k, n, m, a = layout.num_workers, per_worker_batch_size, layout.workers_per_device, accumulation_steps
    if m % a:
        raise ValueError(f"config.accumulation_steps={a} must divide the {m} workers per device")
    g = m // a  # workers per microstep

    def worker_loss(params, stats, x, y):
        """One worker: forward on its n examples with its own BN statistics; loss / (kn) (Remark 3)."""
        logits, new_vars = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        ce = cross_entropy(logits, y, label_smoothing)
        correct = jnp.sum(jnp.argmax(logits, -1) == y)
        return jnp.sum(ce) / (k * n), (new_vars.get("batch_stats", {}), jnp.sum(ce), correct)

    def group_loss(params, stats, x, y):
        losses, aux = jax.vmap(worker_loss, in_axes=(None, 0, 0, 0))(params, stats, x, y)
        return jnp.sum(losses), aux

    grad_fn = jax.grad(group_loss, has_aux=True)

    def per_device(state: TrainState, images, labels):
        split = lambda t: t.reshape(a, g, *t.shape[1:])  # noqa: E731 - [m,...] -> [a, m/a, ...]
        x = images.reshape(a, g, n, *images.shape[1:])
        y = labels.reshape(a, g, n)
        stats = jax.tree.map(split, state.batch_stats)
        if a == 1:
            grads, (new_stats, ce_sum, correct) = grad_fn(state.params, *jax.tree.map(lambda t: t[0], (stats, x, y)))
            new_stats = jax.tree.map(lambda t: t[None], new_stats)
            ce_sum, correct = jnp.sum(ce_sum), jnp.sum(correct)
        else:

            def microstep(acc, inputs):
                grads, (st, ce, c) = grad_fn(state.params, *inputs)
                return jax.tree.map(jnp.add, acc, grads), (st, jnp.sum(ce), jnp.sum(c))

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grads, (new_stats, ce_sum, correct) = jax.lax.scan(microstep, zeros, (stats, x, y))
            ce_sum, correct = jnp.sum(ce_sum), jnp.sum(correct)
        new_stats = jax.tree.map(lambda t: t.reshape(m, *t.shape[2:]), new_stats)
        grads = aggregators.allreduce_sum(grads, AXIS, method=aggregation, bucket_mb=bucket_mb)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        totals = jax.lax.psum(jnp.stack([ce_sum, correct.astype(jnp.float32)]), AXIS)
        metrics = {
            "loss": totals[0] / (k * n),
            "accuracy": totals[1] / (k * n),
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
        }
        new_state = TrainState(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state)
        return new_state, metrics

    def step(state, images, labels):
        specs = state_specs(state)
        fn = jax.shard_map(
            per_device, mesh=layout.mesh, in_specs=(specs, P(AXIS), P(AXIS)), out_specs=(specs, P()), check_vma=False
        )
        return fn(state, images, labels)

    return jax.jit(step, donate_argnums=0)


def make_eval_step(model, layout: layout_lib.WorkerLayout):
    """Build the jitted eval step ``(state, images, labels, mask) -> sums`` (BN statistics averaged over workers)."""

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

    def step(state: TrainState, images, labels, mask):
        stats = jax.tree.map(lambda t: jnp.mean(t, axis=0), state.batch_stats)
        fn = jax.shard_map(
            per_device, mesh=layout.mesh, in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS)), out_specs=P(), check_vma=False
        )
        return fn(state.params, stats, images, labels, mask)

    return jax.jit(step)


def global_batch(layout: layout_lib.WorkerLayout, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assemble this process's rows into global arrays sharded over the mesh (worker-major)."""
    sharding = layout.sharding(P(AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def evaluate(eval_step, state, dataset, layout, config) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy over every evaluation example exactly once."""
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
        totals += np.asarray(jax.device_get(eval_step(state, b["image"], b["label"], b["mask"])), np.float64)
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


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Train ``config`` in ``workdir`` (resuming from its latest checkpoint) and return results.json's dict."""
    from clu import metric_writers, periodic_actions
    import orbax.checkpoint as ocp

    from lbsgd import validate
    from lbsgd.data import order, pipeline

    t_start = time.time()
    is_chief = jax.process_index() == 0
    layout = layout_lib.make_layout(config.num_workers, config.num_devices)
    k, n = config.num_workers, config.per_worker_batch_size
    kn = k * n

    if is_chief or jax.process_count() == 1:
        dataset = pipeline.load(config.dataset, config.data_dir)  # the chief prepares digits first
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dataset prepared")
        if not is_chief:
            dataset = pipeline.load(config.dataset, config.data_dir)
    validate.check_dataset(config, dataset.train.num_examples)

    spe = order.steps_per_epoch(dataset.train.num_examples, kn)
    total_steps = config.num_epochs * spe
    if config.max_steps > 0:
        total_steps = min(total_steps, config.max_steps)
    tx, schedule = optim.from_config(config, spe)
    model = build_model(config, dataset.num_classes)
    image_shape = (config.image_size, config.image_size, dataset.channels)

    # Only process 0 writes metrics (events and log lines); the others stay quiet.
    writer = (
        metric_writers.create_default_writer(workdir, asynchronous=False)
        if is_chief
        else metric_writers.MultiWriter([])
    )
    state = create_train_state(model, tx, layout, image_shape, config.seed)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    log.info(
        "model %s: %s parameters; k=%d workers x n=%d = %d per step on %d devices (%d processes), "
        "%d workers/device; %d steps/epoch, %d steps",
        config.model,
        f"{num_params:,}",
        k,
        n,
        kn,
        layout.num_devices,
        layout.num_processes,
        layout.workers_per_device,
        spe,
        total_steps,
    )
    writer.write_hparams({k_: v for k_, v in config.items() if isinstance(v, (int, float, str, bool))})

    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True))
    if mngr.latest_step() is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(abstract))
        log.info("resumed from checkpoint at step %d", int(state.step))
    start_step = int(state.step)

    accumulation = resolve_accumulation(
        layout.workers_per_device, n, config.accumulation_steps, config.get("max_device_batch", 0)
    )
    if accumulation > 1:
        log.info(
            "%d workers per device run in %d accumulation microsteps of %d workers (%d examples)",
            layout.workers_per_device,
            accumulation,
            layout.workers_per_device // accumulation,
            layout.workers_per_device // accumulation * n,
        )
    train_step = make_train_step(
        model,
        tx,
        schedule,
        layout,
        per_worker_batch_size=n,
        aggregation=config.aggregation,
        bucket_mb=config.bucket_mb,
        accumulation_steps=accumulation,
        label_smoothing=config.label_smoothing,
    )
    eval_step = make_eval_step(model, layout)
    batches = pipeline.train_iterator(
        dataset,
        num_workers=k,
        per_worker_batch_size=n,
        seed=config.seed,
        first_worker=layout.first_worker,
        num_local_workers=layout.local_workers,
        start_step=start_step,
        augment=config.augment,
        image_size=config.image_size,
    )

    hooks = (
        [
            periodic_actions.ReportProgress(
                num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps
            )
        ]
        if is_chief
        else []
    )
    bar = None
    if is_chief and sys.stdout.isatty():
        import tqdm

        bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
    eval_every = max(1, int(config.eval_every_epochs * spe)) if config.eval_every_epochs > 0 else 0
    block = _blocking_needed()
    window, last_metrics, eval_metrics = [], None, None
    t_train, timed_steps = None, 0
    stop = _StopOnSignal(enabled=layout.num_processes == 1)
    last_saved = start_step
    try:
        for step in range(start_step, total_steps):
            b = global_batch(layout, next(batches))
            state, metrics = train_step(state, b["image"], b["label"])
            if block:
                jax.block_until_ready(state)
            window.append(metrics)
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
            if done % config.log_every_steps == 0 or done == total_steps:
                means = {k_: float(np.mean([float(m_[k_]) for m_ in jax.device_get(window)])) for k_ in window[0]}
                last_metrics = jax.device_get(metrics)
                writer.write_scalars(done, {f"train_{k_}": v for k_, v in means.items()})
                if bar is not None:
                    bar.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{means['accuracy']:.3f}")
                window = []
            if (eval_every and done % eval_every == 0) or done == total_steps:
                eval_metrics = evaluate(eval_step, state, dataset, layout, config)
                writer.write_scalars(done, eval_metrics)
                log.info(
                    "step %d/%d (epoch %.2f): eval accuracy %.4f, loss %.4f",
                    done,
                    total_steps,
                    done / spe,
                    eval_metrics["eval_accuracy"],
                    eval_metrics["eval_loss"],
                )
            if done % config.checkpoint_every_steps == 0 or done == total_steps:
                mngr.save(done, args=ocp.args.StandardSave(state))
                last_saved = done
            preempted = stop.signum is not None or (layout.num_processes > 1 and mngr.reached_preemption(done))
            if preempted and done < total_steps:
                if last_saved != done:
                    mngr.save(done, args=ocp.args.StandardSave(state), force=True)
                mngr.wait_until_finished()
                raise Interrupted(stop.signum or signal.SIGTERM, done, ckpt_dir)
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        writer.flush()
    t_end = time.time()
    if eval_metrics is None:  # nothing left to train (resumed a finished run): evaluate the final state
        eval_metrics = evaluate(eval_step, state, dataset, layout, config)
    if last_metrics is None:
        last_metrics = {"loss": float("nan")}
    mngr.wait_until_finished()
    mngr.close()
    writer.flush()

    train_time = (t_end - t_train) if t_train is not None else 0.0
    results = {
        "eval_accuracy": float(eval_metrics["eval_accuracy"]),
        "eval_loss": float(eval_metrics["eval_loss"]),
        "eval_top1_error": 1.0 - float(eval_metrics["eval_accuracy"]),
        "eval_top5_error": 1.0 - float(eval_metrics["eval_top5_accuracy"]),
        "eval_examples": int(eval_metrics["eval_examples"]),
        "train_loss": float(last_metrics["loss"]),  # loss of the last step, over its kn examples
        "steps": int(state.step),
        "epochs": int(state.step) / spe,
        "global_batch_size": kn,
        "num_workers": k,
        "per_worker_batch_size": n,
        "devices": layout.num_devices,
        "processes": layout.num_processes,
        "workers_per_device": layout.workers_per_device,
        "accumulation_steps": accumulation,
        "aggregation": config.aggregation,
        "num_params": num_params,
        "wall_time_s": time.time() - t_start,
        "images_per_second": (timed_steps * kn / train_time) if train_time > 0 else 0.0,
        "backend": jax.default_backend(),
    }
    if is_chief:
        path = os.path.join(workdir, "results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(path + ".tmp", path)
        log.info("results: %s", json.dumps(results))
    return results


def load_checkpoint(workdir: str, step: int | None = None) -> dict[str, Any]:
    """Read a checkpoint of ``workdir`` as a pytree of numpy arrays on the host (any topology).

    ``step=None`` reads the latest. Returns ``{'step', 'params', 'batch_stats', 'opt_state'}``; each
    ``batch_stats`` leaf has the leading worker axis of size k.
    """
    import orbax.checkpoint as ocp

    ckpts = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) if os.path.isdir(ckpts) else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckpts}")
    path = os.path.join(ckpts, str(steps[-1] if step is None else step), "default")
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
