"""A run's program from its config: model, optimizer, strategy, accumulation, the initial state and the
compiled-to-be train and eval steps. The trainer and the benchmarks (``lbsgd.bench``) both build it here,
so a benchmark times exactly the step a run trains with.

Needs JAX, Flax and Optax only (no TensorFlow, no dataset): a benchmark builds it from
``lbsgd.config.schema.base_config()`` with its own overrides on random inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from lbsgd import optim, strategies
from lbsgd.models import factory as model_factory
from lbsgd.parallel import layout as layout_lib
from lbsgd.trainer import grads as grads_lib
from lbsgd.trainer.state import TrainState, create_train_state
from lbsgd.trainer.step import make_consensus_fn, make_eval_step, make_train_step


@dataclasses.dataclass
class Program:
    """What runs on the devices for one config: the model, ``tx`` and its schedule, the strategy, the
    microsteps per step, and the jitted train step, eval step and consensus distance."""

    config: Any
    layout: layout_lib.WorkerLayout
    image_shape: tuple[int, ...]  # one example: (H, W, C) for an image model, (L, C) for a 1-D one
    model: Any
    tx: Any
    schedule: Any
    strategy: strategies.Strategy
    accumulation: int
    train_step: Callable
    eval_step: Callable
    consensus_fn: Callable

    def init_state(self) -> TrainState:
        """The state every worker starts from: parameters from ``config.seed``, placed on the mesh."""
        return create_train_state(
            self.model, self.tx, self.layout, self.image_shape, self.config.seed, self.strategy,
            noise_scale=self.config.noise_scale,
        )  # fmt: skip


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


def build(config, layout: layout_lib.WorkerLayout, *, num_classes: int, channels: int, steps_per_epoch: int) -> Program:
    """The program of ``config`` on ``layout`` for a dataset of ``num_classes`` classes and inputs (images,
    or signals for a 1-D model) of ``channels`` channels, with ``steps_per_epoch`` steps an epoch (the
    schedule counts in epochs)."""
    tx, schedule = optim.from_config(config, steps_per_epoch)
    model = model_factory.from_config(config, num_classes)
    strategy = strategies.from_config(config, layout.num_devices).bind(schedule, steps_per_epoch)
    units, per_unit = grads_lib.bn_units(layout.workers_per_device, config.bn_group_size)  # (m, 1) without BN groups
    accumulation = resolve_accumulation(
        units, per_unit * config.per_worker_batch_size, config.accumulation_steps, config.max_device_batch
    )
    train_step = make_train_step(
        model,
        tx,
        schedule,
        layout,
        per_worker_batch_size=config.per_worker_batch_size,
        strategy=strategy,
        accumulation_steps=accumulation,
        label_smoothing=config.label_smoothing,
        skip_nonfinite=config.on_nonfinite == "skip",
        noise_scale=config.noise_scale,
        noise_scale_decay=config.noise_scale_decay,
        steps_per_dispatch=config.steps_per_dispatch,
        bn_group_size=config.bn_group_size,
    )
    return Program(
        config=config,
        layout=layout,
        image_shape=model_factory.input_shape(config.model, config.image_size, channels),
        model=model,
        tx=tx,
        schedule=schedule,
        strategy=strategy,
        accumulation=accumulation,
        train_step=train_step,
        eval_step=make_eval_step(model, layout, strategy),
        consensus_fn=make_consensus_fn(strategy),
    )
