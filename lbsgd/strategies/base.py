"""The strategy interface: how k workers combine, and which state each of them owns.

A *strategy* answers these questions for the train step (``lbsgd.trainer.step``), and nothing else:

1. **State** — ``init``/``specs``: are the parameters and optimizer state shared (one copy, replicated)
   or per worker (a leading axis of size k, sharded over the mesh like the per-worker BN statistics),
   and what extra state does the strategy own (push-sum weights, an EASGD centre, …).
2. **Loss scale** — ``loss_denominator``: k·n when gradients are summed across workers (Remark 3),
   n when each worker steps on the mean gradient of its own examples.
3. **Where the gradient is taken** — ``prepare``: the parameters each worker differentiates at (the
   shared copy, its own copy, its copy after gossip, its de-biased push-sum copy), and
   ``grad_per_worker``: whether those are one copy or one per worker.
4. **Combine** — ``reduce``: from this device's workers' gradients to the gradient the step uses (the
   sum over all k workers for allreduce; each worker's own for decentralized strategies); ``apply``:
   from that gradient to the new state (one optimizer step, or each worker's own step plus mixing).
5. **Report** — ``eval_params`` (which model evaluation uses), ``extra_eval_params``, ``worker_params``
   (for the consensus distance), ``step_metrics``, ``bytes_sent_per_worker_per_step``, ``step_time``
   (the α-β model of ``lbsgd.costmodel``) and ``describe`` (results.json's fields).
6. **Construction** — ``from_config``: the strategy object of a run from its config and options.

``prepare``, ``reduce`` and ``apply`` run inside ``jax.shard_map`` on this device's m = k/d workers
(per-worker leaves have a leading axis of m there); ``init``, ``eval_params`` and ``worker_params`` run
on global arrays. A strategy is one module that registers itself (``lbsgd.strategies.registry``); the
trainer never names one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from lbsgd.parallel import mixing
from lbsgd.parallel.layout import AXIS


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a strategy sees inside the per-device program: the layout and the step being taken."""

    axis: str  # the mesh axis name
    num_workers: int  # k
    num_devices: int  # d
    workers_per_device: int  # m
    step: Any  # the step number t being taken (a replicated int32 scalar)


@dataclasses.dataclass(frozen=True)
class Strategy:
    """Base class; subclasses set ``name`` and ``per_worker`` and override what differs."""

    name: ClassVar[str] = ""  # set by ``registry.register``
    per_worker: ClassVar[bool] = True  # parameters and optimizer state carry a leading worker axis
    # ``reduce`` returns one gradient summed over all k workers (the gradient noise scale needs it).
    supports_noise_scale: ClassVar[bool] = False
    # Every worker takes its gradient at one shared copy, so a BN group of workers is one model (bn_group_size > 1).
    supports_bn_groups: ClassVar[bool] = False
    uses_aggregation: ClassVar[bool] = False  # ``config.aggregation``/``bucket_mb`` choose how it sums

    @classmethod
    def from_config(cls, config, options, num_devices: int) -> "Strategy":
        """The strategy of a run: ``config`` (the whole run config), ``options`` (its ``registry.Options``
        from ``config.<section>``) and the device count d. Default: no fields to set."""
        return cls()

    def bind(self, schedule, steps_per_epoch: int) -> "Strategy":
        """This strategy for a run whose learning rate follows ``schedule`` (an optax schedule of the step)
        with ``steps_per_epoch`` steps an epoch, for options tied to the rate or given in epochs. Called once
        by ``lbsgd.trainer.build``; default: itself."""
        return self

    @property
    def grad_per_worker(self) -> bool:
        """True when ``prepare`` gives each worker its own parameters (a leading worker axis): then the
        gradient is per worker too. Per-worker strategies, and shared ones whose workers compute on
        their own (stale) copies, like the asynchronous parameter server."""
        return self.per_worker

    # -- state ---------------------------------------------------------------------------------
    def init(self, params, tx: optax.GradientTransformation, num_workers: int):
        """(params, opt_state, extra) from one freshly initialised model (every worker starts equal)."""
        if not self.per_worker:
            return params, tx.init(params), {}
        stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_workers, *x.shape)), params)
        return stacked, jax.vmap(tx.init)(stacked), self.init_extra(num_workers)

    def init_extra(self, num_workers: int) -> Any:
        """The strategy's own state (global arrays); none by default."""
        return {}

    def specs(self, params, opt_state, extra):
        """PartitionSpecs of (params, opt_state, extra): per-worker leaves split by worker, others replicated."""
        spec = P(AXIS) if self.per_worker else P()
        return (
            jax.tree.map(lambda _: spec, params),
            jax.tree.map(lambda _: spec, opt_state),
            jax.tree.map(lambda _: P(AXIS), extra),
        )

    # -- the step (inside shard_map) -------------------------------------------------------------
    def loss_denominator(self, num_workers: int, per_worker_batch_size: int) -> int:
        """k·n when gradients are summed over workers (Remark 3), n when each worker steps alone."""
        return per_worker_batch_size if self.per_worker else num_workers * per_worker_batch_size

    def prepare(self, ctx: StepContext, params, extra):
        """The parameters each of this device's workers takes its gradient at (default: its own)."""
        return params

    def reduce(self, ctx: StepContext, grads):
        """The gradient the step is taken on, from this device's workers' gradients (default: each
        worker's own, unchanged)."""
        return grads

    def apply(self, ctx: StepContext, tx, params, opt_state, extra, grad_params, reduced):
        """New (params, opt_state, extra) from the ``reduce``d gradient taken at ``grad_params``."""
        raise NotImplementedError

    def update(self, ctx: StepContext, tx, params, opt_state, extra, grad_params, grads):
        """``apply`` after ``reduce``: new (params, opt_state, extra) from the workers' gradients."""
        return self.apply(ctx, tx, params, opt_state, extra, grad_params, self.reduce(ctx, grads))

    def mix_batch_stats(self, ctx: StepContext, batch_stats):
        """Each worker's BN running statistics ([m, ...] leaves) after this step's own update (e.g. averaged
        when the models are); default: unchanged."""
        return batch_stats

    def step_metrics(self, ctx: StepContext, extra) -> dict:
        """Scalars to log for this step, equal on every device (e.g. gradient staleness); none by default."""
        return {}

    # -- reporting (global arrays) ----------------------------------------------------------------
    def eval_params(self, params, extra):
        """The one model evaluation uses (default: the shared copy, or the workers' average)."""
        return mixing.worker_mean(params) if self.per_worker else params

    extra_eval_models: ClassVar[tuple[str, ...]] = ()  # further models evaluated and logged, by name

    def extra_eval_params(self, name: str, params, extra):
        """The model ``name`` of ``extra_eval_models`` (e.g. EASGD's worker average)."""
        raise KeyError(f"strategy {self.name!r} has no evaluation model {name!r}")

    def worker_params(self, params, extra):
        """Each worker's model ([k, ...] leaves) for the consensus distance; None when there is one copy."""
        return params if self.per_worker else None

    def bytes_sent_per_worker_per_step(self, num_workers: int, model_bytes: int) -> float:
        """Bytes one worker sends per step, by the algorithm (not by how workers share devices)."""
        raise NotImplementedError

    def step_time(self, compute_s: float, num_workers: int, model_bytes: float, alpha: float, beta: float) -> float:
        """Modelled seconds per step: ``compute_s`` for a worker's forward/backward plus this strategy's
        communication on a network of latency α and inverse bandwidth β (α-β model, ``lbsgd.costmodel``).
        ``compute_s`` may also be an [S, k] table of each worker's compute time at each step (stragglers,
        ``lbsgd.stragglers``): then the mean seconds per step over those S steps, with the strategy's waits."""
        raise NotImplementedError

    def result_fields(self, extra, num_workers: int, model_bytes: int) -> dict:
        """The strategy's own results.json fields from the final ``extra`` (global arrays); none by default."""
        return {}

    def describe(self) -> dict:
        """Fields for results.json and the log: the strategy's name and options."""
        return {"strategy": self.name}


def per_worker_values(values, leaf):
    """Per-worker scalars ``values`` [m] shaped to broadcast against a per-worker ``leaf`` [m, ...]."""
    return values.reshape(-1, *([1] * (leaf.ndim - 1)))


def local_steps(tx, grads, opt_state, params):
    """Each worker's own optimizer step (vmapped over the leading worker axis): (updates, opt_state)."""
    return jax.vmap(tx.update)(grads, opt_state, params)
