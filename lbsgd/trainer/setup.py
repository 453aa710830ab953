"""What a run is built from: layout, dataset, its program (``lbsgd.trainer.build``: model, optimizer,
strategy, steps) and metric writer, and the state it starts from (fresh from ``config.seed``, or the
workdir's newest intact checkpoint)."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from clu import metric_writers
from jax.experimental import multihost_utils

from lbsgd import checkpoint, strategies
from lbsgd.config import validate
from lbsgd.data import holdout, order, pipeline
from lbsgd.errors import CheckpointError, ConfigError
from lbsgd.models import factory as model_factory
from lbsgd.parallel import layout as layout_lib
from lbsgd.trainer.build import Program, build
from lbsgd.trainer.state import TrainState, model_bytes, num_parameters

log = logging.getLogger("lbsgd")

build_model = model_factory.from_config  # the model named by config.model at config.dtype


@dataclasses.dataclass
class Run:
    """What ``setup`` builds for a run: data, its program (model, optimizer, strategy, steps), layout,
    writer and step counts."""

    config: Any
    workdir: str
    layout: layout_lib.WorkerLayout
    dataset: Any
    steps_per_epoch: int
    total_steps: int
    program: Program
    writer: Any
    is_chief: bool
    t_start: float
    target_reached_s: float | None = None  # seconds from t_start to the first eval >= config.target_accuracy

    @property
    def strategy(self) -> strategies.Strategy:
        """The program's strategy."""
        return self.program.strategy

    @property
    def accumulation(self) -> int:
        """Microsteps per step."""
        return self.program.accumulation

    @property
    def checkpoint_dir(self) -> str:
        """``WORKDIR/checkpoints`` (absolute)."""
        return checkpoint.checkpoint_dir(self.workdir)


def load_dataset(config):
    """Load (and on first use prepare) the dataset; with several processes the chief prepares it first."""
    is_chief = jax.process_index() == 0
    dataset = pipeline.load(config.dataset, config.data_dir) if is_chief or jax.process_count() == 1 else None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dataset prepared")
        if not is_chief:
            dataset = pipeline.load(config.dataset, config.data_dir)
    if config.validation_fraction > 0:  # tuning: evaluate on held-out training examples; the test split is dropped
        dataset = holdout.hold_out(dataset, config.validation_fraction)
    return dataset


def check_input(config, dataset) -> None:
    """The model reads what the dataset holds (images, or signals for a 1-D model) at ``config.image_size``
    with ``config.augment``: one-line ``ConfigError`` naming the fix."""
    kind = model_factory.input_kind(config.model)
    if kind != dataset.kind:
        models = ", ".join(n for n in model_factory.NAMES if model_factory.input_kind(n) == dataset.kind)
        raise ConfigError(
            f"config.model={config.model!r} reads {kind}s but {config.dataset} holds {dataset.kind}s; "
            f"use --config.model=<one of {models}>"
        )
    problem = pipeline.input_problem(dataset, config.augment, config.image_size)
    if problem:
        raise ConfigError(problem)
    if kind == "signal" and config.model_stem not in ("", "small"):
        raise ConfigError(f"config.model_stem={config.model_stem!r} is for 2-D ResNets; use --config.model_stem=''")


def setup(config, workdir: str) -> Run:
    """Layout, dataset, program (``lbsgd.trainer.build``) and metric writer for ``config``."""
    t_start = time.time()
    is_chief = jax.process_index() == 0
    layout = layout_lib.make_layout(config.num_workers, config.num_devices)
    dataset = load_dataset(config)
    validate.check_dataset(config, dataset.train.num_examples)
    check_input(config, dataset)
    kn = config.num_workers * config.per_worker_batch_size
    spe = order.steps_per_epoch(dataset.train.num_examples, kn)
    total_steps = config.num_epochs * spe
    if config.max_steps > 0:
        total_steps = min(total_steps, config.max_steps)
    # Only process 0 writes metrics (events and log lines); the others stay quiet.
    writer = (
        metric_writers.create_default_writer(workdir, asynchronous=False)
        if is_chief
        else metric_writers.MultiWriter([])
    )
    program = build(config, layout, num_classes=dataset.num_classes, channels=dataset.channels, steps_per_epoch=spe)
    return Run(
        config=config,
        workdir=workdir,
        layout=layout,
        dataset=dataset,
        steps_per_epoch=spe,
        total_steps=total_steps,
        program=program,
        writer=writer,
        is_chief=is_chief,
        t_start=t_start,
    )


def describe(run: Run, state: TrainState) -> None:
    """Log the run in one line: model, k x n on the layout, strategy, bytes sent, steps."""
    config, lay, k, n = run.config, run.layout, run.config.num_workers, run.config.per_worker_batch_size
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


def restore_or_init(run: Run, mngr) -> TrainState:
    """A fresh state from ``config.seed``, or the newest intact checkpoint of the workdir when there is one
    (``checkpoint.restore_latest``: a damaged newest one is moved aside with a warning)."""
    state = run.program.init_state()
    describe(run, state)
    if mngr.all_steps():
        sync = lambda: multihost_utils.sync_global_devices("checkpoint fallback")  # noqa: E731
        barrier = sync if run.layout.num_processes > 1 else None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = checkpoint.restore_latest(mngr, run.workdir, abstract, run.is_chief, barrier)
        if restored is not None:
            state = restored
            log.info("resumed from checkpoint at step %d", int(state.step))
    step = int(state.step)
    if step > run.total_steps:
        config = run.config
        raise CheckpointError(
            f"--workdir={run.workdir} holds a run at step {step}, past the {run.total_steps} steps this config trains "
            f"(num_epochs={config.num_epochs}, max_steps={config.max_steps}, {run.steps_per_epoch} steps an epoch); "
            f"raise --config.num_epochs to at least {-(-step // run.steps_per_epoch)} (or --config.max_steps), "
            f"or use a new --workdir"
        )
    return state
