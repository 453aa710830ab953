"""The training loop: steps from the state's step to the end — train, log, evaluate, checkpoint — and a
clean stop on a signal (``lbsgd.stopping``: finish the step, checkpoint, stop) or a non-finite value.

Whenever the host reads the device anyway (logging, evaluation, checkpointing, the end, a stop), it first
checks the steps' non-finite flags (``check_nonfinite``), so a non-finite state is never evaluated or saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time

import jax
import numpy as np
import tqdm
from clu import periodic_actions

from lbsgd import checkpoint
from lbsgd.data import pipeline
from lbsgd.errors import Interrupted, NonFinite
from lbsgd.stopping import STOP
from lbsgd.trainer.evaluation import evaluate_run, global_batch
from lbsgd.trainer.setup import Run
from lbsgd.trainer.state import TrainState

log = logging.getLogger("lbsgd")


def check_nonfinite(pending: list, state: TrainState, config) -> None:
    """Look at the ``nonfinite`` flags of the steps since the last check (fetched with the metrics).

    ``config.on_nonfinite='stop'``: raise ``NonFinite`` naming the first bad step. ``'skip'``: the step
    already kept the old state; log it, and raise once ``config.max_consecutive_nonfinite`` steps in a
    row were skipped. ``pending`` holds ``(first step, flag or [flags] of the steps from it)`` and is emptied.
    """
    if not pending:
        return
    flags = jax.device_get([flag for _, flag in pending])
    bad = [first + j for (first, _), flag in zip(pending, flags) for j, f in enumerate(np.atleast_1d(flag)) if f > 0]
    pending.clear()
    if not bad:
        return
    if config.on_nonfinite == "stop":
        raise NonFinite(bad[0], "config.on_nonfinite='stop'")
    total, consecutive = (int(v) for v in jax.device_get(state.nonfinite))
    log.warning("non-finite loss or gradient at step(s) %s: update skipped (%d skipped in total)", bad, total)
    limit = config.max_consecutive_nonfinite
    if consecutive >= limit:
        raise NonFinite(bad[-1], f"{consecutive} consecutive steps skipped, config.max_consecutive_nonfinite={limit}")


def blocking_needed() -> bool:
    """True on the CPU backend, where a step with collectives dispatched while the previous one is still
    running can abort the process (a rendezvous timeout, measured): the loop then waits on every step."""
    return jax.default_backend() == "cpu"


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


def record_epoch(run: Run, step: int, metrics: list[dict]) -> None:
    """Append the mean training metrics of the steps since the last epoch boundary (``metrics``; after a
    resume, those run since it) to ``WORKDIR/train_history.jsonl`` (chief only; a reader keeps the last
    line per step)."""
    if not run.is_chief or not metrics:
        return
    means, count = _means(metrics)
    row = {"step": step, "epoch": step / run.steps_per_epoch, "steps_averaged": count}
    row.update({f"train_{key}": value for key, value in means.items()})
    row.update({f"last_{key}": float(value) for key, value in _last(metrics[-1]).items() if key.startswith("noise_")})
    with open(os.path.join(run.workdir, "train_history.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def _means(metrics: list[dict]) -> tuple[dict[str, float], int]:
    """Mean of each metric over the steps of ``metrics`` (one dict per dispatch, scalars or [s] arrays)."""
    values = jax.device_get(metrics)
    stacked = {key: np.concatenate([np.atleast_1d(m[key]) for m in values]) for key in values[0]}
    return {key: float(np.mean(v.astype(np.float64))) for key, v in stacked.items()}, len(next(iter(stacked.values())))


def _last(metrics: dict) -> dict:
    """The last step's metrics of one dispatch's (scalars, or [s] arrays of s steps)."""
    return {key: np.atleast_1d(value)[-1] for key, value in jax.device_get(metrics).items()}


def _crossed(done: int, count: int, every: int) -> bool:
    """Whether a multiple of ``every`` lies in the steps (done - count, done] (a dispatch of ``count``)."""
    return every > 0 and done // every > (done - count) // every


@dataclasses.dataclass
class _Books:
    """The loop's running records: metrics since the last log line and epoch, flags not yet checked."""

    window: list = dataclasses.field(default_factory=list)
    epoch_window: list = dataclasses.field(default_factory=list)
    pending: list = dataclasses.field(default_factory=list)  # (step, non-finite flag) not yet looked at
    last_metrics: dict | None = None
    eval_metrics: dict | None = None


def _batches(run: Run, start_step: int):
    config, lay = run.config, run.layout
    return pipeline.train_iterator(
        run.dataset,
        num_workers=config.num_workers,
        per_worker_batch_size=config.per_worker_batch_size,
        seed=config.seed,
        first_worker=lay.first_worker,
        num_local_workers=lay.local_workers,
        start_step=start_step,
        augment=config.augment,
        image_size=config.image_size,
        num_steps=run.total_steps - start_step,
    )


def _dispatch_batch(lay, batches, count: int, stacked: bool):
    """The next ``count`` steps' batches on the mesh: one step's (``stacked`` False, count 1) or ``count``
    steps' stacked on a leading axis (several steps per dispatch)."""
    if not stacked:
        b = global_batch(lay, next(batches))
        return b["image"], b["label"]
    local = [next(batches) for _ in range(count)]
    b = global_batch(lay, {key: np.stack([step[key] for step in local]) for key in local[0]}, stacked=True)
    return b["image"], b["label"]


def _progress(run: Run, start_step: int):
    """The chief's progress reporters: clu's steps/s line and, on a terminal, a progress bar."""
    if not run.is_chief:
        return [], None
    every = run.config.log_every_steps
    hooks = [periodic_actions.ReportProgress(num_train_steps=run.total_steps, writer=run.writer, every_steps=every)]
    bar = None
    if sys.stdout.isatty():
        bar = tqdm.tqdm(total=run.total_steps, initial=start_step, unit="step", dynamic_ncols=True)
    return hooks, bar


def _log_train(run: Run, books: _Books, done: int, metrics, bar) -> None:
    """Write the mean training metrics since the last log line."""
    means, _ = _means(books.window)
    books.last_metrics = _last(metrics)
    run.writer.write_scalars(done, {f"train_{k}": v for k, v in means.items()})
    if bar is not None:
        bar.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{means['accuracy']:.3f}")
    books.window = []


def _after_step(run: Run, books: _Books, state, metrics, done: int, count: int, mngr, eval_fns, preempted, bar) -> bool:
    """Bookkeeping after the ``count`` steps that end at step ``done``: flags, epoch record, log line,
    evaluation, checkpoint — each when its interval ends within those steps (so with several steps per
    dispatch, at the end of the dispatch). Returns whether a checkpoint of ``done`` was saved."""
    config, spe, total = run.config, run.steps_per_epoch, run.total_steps
    eval_every = max(1, int(config.eval_every_epochs * spe)) if config.eval_every_epochs > 0 else 0
    evaluate_now = _crossed(done, count, eval_every) or done == total
    save_now = _crossed(done, count, config.checkpoint_every_steps) or done == total
    epoch_end = _crossed(done, count, spe) or done == total
    log_now = _crossed(done, count, config.log_every_steps) or done == total
    if evaluate_now or save_now or preempted or epoch_end or log_now:
        check_nonfinite(books.pending, state, config)
    if epoch_end:
        record_epoch(run, done, books.epoch_window)
        books.epoch_window = []
    if log_now:
        _log_train(run, books, done, metrics, bar)
    if evaluate_now:
        books.eval_metrics = evaluate_run(run, *eval_fns, state, done)
    if save_now:
        checkpoint.save(mngr, done, state)
    return bool(save_now)


def train_loop(run: Run, state: TrainState, mngr, train_step, eval_step, consensus_fn) -> LoopResult:
    """Steps from ``state.step`` to the end: train, log, evaluate, checkpoint, stop cleanly on a signal."""
    lay, start_step = run.layout, int(state.step)
    batches = _batches(run, start_step)
    hooks, bar = _progress(run, start_step)
    block, books = blocking_needed(), _Books()
    t_train, timed_steps, last_saved = None, 0, start_step
    installed = STOP.install() if lay.num_processes == 1 else False  # lbsgd.main installs it first thing
    STOP.phase, STOP.signum = "training", None
    t_first = time.time()
    s, done = run.config.steps_per_dispatch, start_step
    try:
        while done < run.total_steps:
            count = min(s, run.total_steps - done)
            state, metrics = train_step(state, *_dispatch_batch(lay, batches, count, stacked=s > 1))
            if block:
                jax.block_until_ready(state)
            books.window.append(metrics)
            books.epoch_window.append(metrics)
            books.pending.append((done + 1, metrics["nonfinite"]))
            if t_train is None:  # the first dispatch includes compilation: time from its end
                jax.block_until_ready(metrics)
                t_train = time.time()
            else:
                timed_steps += count
            done += count
            for h in hooks:  # clu's periodic actions want every step
                for t in range(done - count + 1, done + 1):
                    h(t)
            if bar is not None:
                bar.update(count)
            preempted = STOP.signum is not None or (lay.num_processes > 1 and mngr.reached_preemption(done))
            if _after_step(run, books, state, metrics, done, count, mngr, (eval_step, consensus_fn), preempted, bar):
                last_saved = done
            if preempted and done < run.total_steps:
                if last_saved != done:
                    checkpoint.save(mngr, done, state, force=True)
                mngr.wait_until_finished()
                raise Interrupted(STOP.signum or signal.SIGTERM, done, run.checkpoint_dir)
    finally:
        STOP.phase = "finishing"
        if installed:  # not run by lbsgd.main (a test, a notebook): leave the caller's handlers as they were
            STOP.uninstall()
            STOP.phase = "setup"
        if bar is not None:
            bar.close()
        run.writer.flush()
    train_time = (time.time() - t_train) if t_train is not None else 0.0
    compile_s = (t_train - t_first) if t_train is not None else 0.0
    return LoopResult(
        state, books.last_metrics, books.eval_metrics, train_time, timed_steps, t_first - run.t_start, compile_s
    )
