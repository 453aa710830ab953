"""The train state of k workers, where each of its parts lives on the mesh, and its initialisation.

``params``/``opt_state`` are one shared copy (allreduce) or per worker with a leading axis of size k
(strategies whose workers keep their own parameters); ``batch_stats`` always have the leading worker
axis: each worker keeps its own BatchNorm running statistics (Goyal et al. §2.3); with BN groups
(``bn_group_size`` = g, ``lbsgd.trainer.grads``) every worker of a group holds the group's.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lbsgd import noise_scale as noise_scale_lib
from lbsgd.parallel import layout as layout_lib
from lbsgd.parallel.layout import AXIS
from lbsgd.strategies.allreduce import Allreduce
from lbsgd.strategies.base import Strategy


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


def state_specs(state: TrainState, strategy: Strategy | None = None) -> TrainState:
    """PartitionSpecs: per-worker leaves (BN statistics, and what the strategy makes per worker) split
    over devices by worker, everything else replicated."""
    strategy = strategy or Allreduce()
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
    strategy: Strategy | None = None,
    noise_scale: bool = False,
) -> TrainState:
    """Initialise parameters from ``seed`` and place the state on the mesh (same values for any layout).

    Every worker starts from the same parameters; ``strategy`` (default allreduce) decides whether they
    are one shared copy or k copies. ``noise_scale``: carry the gradient noise scale's moving average
    (for a step built with ``make_train_step(noise_scale=True)``).
    """
    k = layout.num_workers
    strategy = strategy or Allreduce()

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


def _one_model(state: TrainState, strategy: Strategy):
    """(shape, itemsize) of each leaf of one worker's parameters (the leading worker axis dropped)."""
    drop = 1 if strategy.per_worker else 0
    return [(x.shape[drop:], x.dtype.itemsize) for x in jax.tree.leaves(state.params)]


def num_parameters(state: TrainState, strategy: Strategy) -> int:
    """Parameters of one model (one worker's copy)."""
    return sum(int(np.prod(shape)) for shape, _ in _one_model(state, strategy))


def model_bytes(state: TrainState, strategy: Strategy) -> int:
    """Bytes of one worker's parameters (what a worker sends when it sends its model)."""
    return sum(int(np.prod(shape)) * size for shape, size in _one_model(state, strategy))
