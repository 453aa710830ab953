"""The train step every benchmark times, built exactly as a run builds it: ``lbsgd.trainer.build``.

A benchmark describes its setting as a run config (``bench_config``: ``lbsgd.config.schema.base_config()``
with the bench's model, dtype, k workers x n examples, image size, accumulation and strategy set on it),
builds the run's ``Program`` from it (``build_program``) and times ``program.train_step`` on random
inputs (``measure_step``). There is no second copy of the setup: what is timed is what trains.

The learning rate only changes the step's arithmetic, not its cost; the bench keeps the schedule it has
always used (``LEARNING_RATE``: Goyal's ImageNet recipe, eta = 0.1 per 256 examples, gradual warmup over
5 of 90 epochs, step decay, weight decay 1e-4, ``STEPS_PER_EPOCH`` steps an epoch) so that losses stay
comparable between versions.

This module imports JAX: import it only after the flags are parsed (and ``common.ensure_host_devices``
has run where simulated CPU devices are wanted).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from lbsgd.bench import common
from lbsgd.bench.flops import jaxpr_flops
from lbsgd.config import schema
from lbsgd.parallel import layout as layout_lib
from lbsgd.trainer.build import Program, build

#: Steps an epoch, for the schedule (which counts in epochs); the timed steps all sit inside warmup.
STEPS_PER_EPOCH = 1000

#: Config fields of the bench's schedule and optimizer (goyal_sgd): ``optim.goyal_schedule(0.1, kn,
#: steps_per_epoch=1000)`` with its defaults and ``optim.goyal_sgd``'s weight decay.
LEARNING_RATE = dict(
    optimizer="goyal_sgd",
    base_learning_rate=0.1,
    base_batch_size=256,
    lr_scaling="linear",
    warmup="gradual",
    warmup_epochs=5,
    decay="step",
    decay_epochs=(30, 60, 80),
    decay_factor=0.1,
    num_epochs=90,
    weight_decay=1e-4,
)


def bench_config(
    model: str,
    *,
    num_workers: int,
    per_worker_batch_size: int,
    image_size: int,
    dtype: str = "float32",
    model_width: int = 0,
    accumulation_steps: int = 1,
    strategy: str = "allreduce",
    aggregation: str = "psum",
    model_stem: str = "",
    steps_per_dispatch: int = 1,
) -> ml_collections.ConfigDict:
    """A full run config (``schema.base_config()``) for one benchmark setting.

    k = ``num_workers`` workers of n = ``per_worker_batch_size`` examples; ``model`` at ``dtype``
    ('float32' | 'bfloat16' | 'float16', mapped by ``lbsgd.models.factory.DTYPES``) with ``model_width``
    channels in its first stage (0: the model's default) and ``model_stem`` ('': its own); ``accumulation_steps``
    microsteps a step (0: automatic); ``strategy`` by its registered name, with its option section at
    the defaults; ``aggregation`` for allreduce; ``steps_per_dispatch`` steps a call (``lax.scan``). The
    schedule and optimizer are ``LEARNING_RATE``.
    """
    config = schema.base_config()
    config.update(LEARNING_RATE)
    config.model = model
    config.model_width = model_width
    config.model_stem = model_stem
    config.steps_per_dispatch = steps_per_dispatch
    config.dtype = dtype
    config.num_workers = num_workers
    config.per_worker_batch_size = per_worker_batch_size
    config.image_size = image_size
    config.accumulation_steps = accumulation_steps
    config.strategy = strategy
    config.aggregation = aggregation
    return config


def build_program(config, layout: layout_lib.WorkerLayout, *, num_classes: int, channels: int = 3) -> Program:
    """``lbsgd.trainer.build`` of ``config`` on ``layout`` for ``num_classes`` classes and images of
    ``channels`` channels, ``STEPS_PER_EPOCH`` steps an epoch: the model, optimizer, strategy, microsteps
    and jitted train step a run of ``config`` trains with."""
    return build(config, layout, num_classes=num_classes, channels=channels, steps_per_epoch=STEPS_PER_EPOCH)


def random_batch(num_examples: int, image_size: int, num_classes: int, channels: int = 3, seed: int = 0):
    """Random float32 images (N(0, 1)) and int32 labels, on the host; the same for every benchmark."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(num_examples, image_size, image_size, channels)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=(num_examples,)).astype(np.int32)
    return images, labels


def measure_step(
    program: Program,
    *,
    num_classes: int,
    repeats: int,
    warmup: int = 1,
    count_flops: bool = False,
    in_flight: int = 1,
    profile_dir: str | None = None,
) -> dict:
    """Time ``program.train_step`` from ``program.init_state()`` on a random batch of ``num_classes``.

    k = ``program.layout.num_workers`` workers of n = ``config.per_worker_batch_size`` images. Compiles
    ahead of time (timed apart), then ``common.time_steps``: ``warmup`` untimed windows and ``repeats``
    timed ones of ``in_flight`` steps each, waited for at the end of the window (1, the default, waits on
    every step: never two steps in flight, the CPU collectives hazard); ``times`` are seconds per step
    (with ``config.steps_per_dispatch`` = s, a call runs s steps on s copies of the batch: its time / s).
    With ``profile_dir``, one more window runs under ``jax.profiler.trace`` there (after the timing, so
    the timing is not the profiler's). Returns ``{'times', 'compile_s', 'step_flops', 'xla_flops',
    'memory', 'loss', 'profile_error'}``: ``step_flops`` = model FLOPs per step from the jaxpr when
    ``count_flops`` (else 0), ``xla_flops`` = XLA's cost analysis per device (or None), ``memory`` =
    ``common.memory_analysis`` of the compiled step (or None).
    """
    layout, step = program.layout, program.train_step
    k, n = layout.num_workers, program.config.per_worker_batch_size
    image_size, _, channels = program.image_shape
    state = program.init_state()
    images, labels = random_batch(k * n, image_size, num_classes, channels)
    s = program.config.steps_per_dispatch
    if s > 1:
        images, labels = np.stack([images] * s), np.stack([labels] * s)
    b = layout_lib.global_batch(layout, {"image": images, "label": labels}, stacked=s > 1)
    compiled, compile_s = common.compile_timed(step, state, b["image"], b["label"])
    flops = jaxpr_flops(jax.make_jaxpr(step)(state, b["image"], b["label"]).jaxpr) / s if count_flops else 0.0
    carry = {"state": state}

    def one_step():
        carry["state"], carry["metrics"] = compiled(carry["state"], b["image"], b["label"])

    def wait():
        jax.block_until_ready((carry["state"], carry["metrics"]))

    times = [t / s for t in common.time_steps(one_step, wait, repeats=repeats, warmup=warmup, in_flight=in_flight)]
    profile_error = _profile(profile_dir, one_step, wait, in_flight) if profile_dir else None
    return {
        "times": times,
        "compile_s": compile_s,
        "step_flops": flops,
        "xla_flops": common.xla_flops(compiled),
        "memory": common.memory_analysis(compiled),
        "loss": float(np.atleast_1d(carry["metrics"]["loss"])[-1]),
        "profile_error": profile_error,
    }


def _profile(profile_dir: str, one_step, wait, in_flight: int) -> str | None:
    """One window of steps under ``jax.profiler.trace(profile_dir)``; the error in one line, or None."""
    try:
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            common.time_steps(one_step, wait, repeats=1, warmup=0, in_flight=in_flight)
    except Exception as e:  # noqa: BLE001 - a profiler that cannot run must not cost the timing
        return f"{type(e).__name__}: {e}"
    return None
