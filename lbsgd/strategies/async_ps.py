"""Asynchronous parameter-server SGD (Downpour, Dean et al. 2012), simulated deterministically.

Lian et al. (2015, "Asynchronous parallel stochastic gradient for nonconvex optimization") show that
asynchronous parallel SGD converges at the rate of synchronous SGD as long as the staleness of the
gradients, which grows with the number of workers, stays bounded. This module models that regime
inside the SPMD step, in rounds:

* the server's parameters x and optimizer state are shared (one replicated copy);
* every worker holds the copy it last pulled, and computes its gradient (loss / kn, Remark 3) on that
  copy, which is s_i server updates old (its *staleness*);
* every step the server applies the sum of the k workers' gradients with the ``lbsgd.optim`` step;
* worker i then refreshes its copy on a schedule: ``config.async_ps.delay='fixed'``: after step t when
  (t + 1 + i) mod (τ + 1) = 0 (staggered by worker, so staleness cycles through 0 … τ);
  ``delay='random'``: after a delay drawn uniformly from 1 … τ + 1 steps at each pull, seeded by
  (seed, step, worker) — the same draws on any layout. τ = ``config.async_ps.staleness``.

With τ = 0 every worker pulls every step: allreduce SGD exactly (tested). Each step logs the mean and
maximum staleness of the gradients applied (``train_staleness_mean``, ``train_staleness_max``).

What this models: bounded, deterministic or seeded-random delays between a worker's pull and the
gradient it contributes, with every worker contributing once per round. What it does not: updates
applied one worker at a time (the server applies a round's k gradients together), lock-free races
inside a parameter update (Hogwild-style torn reads), stragglers or workers that contribute at
different rates, and the server's own bandwidth limit (that is in the time model of
``lbsgd.compare``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from lbsgd import costmodel
from lbsgd.parallel import aggregators
from lbsgd.parallel.layout import AXIS
from lbsgd.strategies import registry
from lbsgd.strategies.base import Strategy, per_worker_values

DELAYS = ("fixed", "random")


@dataclasses.dataclass(frozen=True)
class AsyncPSOptions(registry.Options):
    """``config.async_ps``: gradients up to ``staleness`` server steps old; pulls 'fixed' or 'random'."""

    staleness: int = 0
    delay: str = "fixed"

    def validate(self):
        """τ an integer >= 0; ``delay`` one of ``DELAYS``."""
        if not registry.is_count(self.staleness, allow_zero=True):
            return f"config.async_ps.staleness={self.staleness!r} must be an integer >= 0"
        if self.delay not in DELAYS:
            return f"config.async_ps.delay={self.delay!r} is unknown; use one of: {', '.join(DELAYS)}"
        return None


@registry.register(
    "async_ps", AsyncPSOptions, section="async_ps", compare={"async_ps tau=k-1": ("async_ps.staleness={k_minus_1}",)}
)
@dataclasses.dataclass(frozen=True)
class AsyncPS(Strategy):
    """Shared server parameters; workers compute on stale pulled copies; the server sums and steps."""

    per_worker = False  # the server's parameters and optimizer state are one shared copy
    staleness: int = 0
    delay: str = "fixed"
    seed: int = 0
    num_workers: int = 1

    @classmethod
    def from_config(cls, config, options, num_devices):
        """τ, delay model, seed and k."""
        return cls(
            staleness=options.staleness, delay=options.delay, seed=int(config.seed), num_workers=config.num_workers
        )

    @property
    def grad_per_worker(self) -> bool:
        """Each worker differentiates at its own pulled copy."""
        return True

    def _draw(self, step, workers):
        """Pull intervals in 1 … τ+1 drawn after step ``step − 1`` (0: at the start) for the given global
        worker indices: a function of (seed, step, worker) only."""
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)
        return jax.vmap(lambda w: jax.random.randint(jax.random.fold_in(key, w), (), 1, self.staleness + 2))(workers)

    def init(self, params, tx, num_workers):
        """The server copy and optimizer state; every worker's copy = the initial model, age 0."""
        workers = jnp.arange(num_workers)
        copies = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_workers, *x.shape)), params)
        countdown = self._draw(0, workers) if self.delay == "random" else jnp.zeros((num_workers,), jnp.int32)
        extra = {"copy": copies, "age": jnp.zeros((num_workers,), jnp.int32), "countdown": countdown}
        return params, tx.init(params), extra

    def prepare(self, ctx, params, extra):
        """Each worker's gradient is taken at its pulled (stale) copy."""
        return extra["copy"]

    def reduce(self, ctx, grads):
        """The server's gradient: the sum of the k workers' (stale) gradients."""
        local = jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)
        return aggregators.allreduce_sum(local, ctx.axis)

    def apply(self, ctx, tx, params, opt_state, extra, grad_params, total):
        """The server steps on the summed gradient; then the workers due to pull copy the new x."""
        updates, opt_state = tx.update(total, opt_state, params)
        params = optax.apply_updates(params, updates)
        m = ctx.workers_per_device
        workers = lax.axis_index(ctx.axis) * m + jnp.arange(m)
        countdown = extra["countdown"]
        if self.delay == "random":
            countdown = countdown - 1
            pull = countdown <= 0
            countdown = jnp.where(pull, self._draw(ctx.step + 1, workers), countdown)
        else:
            pull = (ctx.step + 1 + workers) % (self.staleness + 1) == 0
        copies = jax.tree.map(
            lambda c, x: jnp.where(per_worker_values(pull, c), x[None].astype(c.dtype), c), extra["copy"], params
        )
        age = jnp.where(pull, 0, extra["age"] + 1)
        return params, opt_state, {"copy": copies, "age": age, "countdown": countdown}

    def step_metrics(self, ctx, extra):
        """Mean and maximum staleness of the gradients applied this step."""
        age = extra["age"].astype(jnp.float32)
        return {
            "staleness_mean": lax.psum(jnp.sum(age), ctx.axis) / self.num_workers,
            "staleness_max": lax.pmax(jnp.max(age), ctx.axis),
        }

    def specs(self, params, opt_state, extra):
        """Server state replicated; the workers' copies, ages and countdowns split by worker."""
        p, o, _ = super().specs(params, opt_state, {})
        return p, o, jax.tree.map(lambda _: P(AXIS), extra)

    def worker_params(self, params, extra):
        """The workers' pulled copies (their distance from each other measures the staleness spread)."""
        return extra["copy"]

    def bytes_sent_per_worker_per_step(self, num_workers, model_bytes):
        """A gradient pushed every step plus a model pulled every τ+1 steps on average."""
        return model_bytes * (1.0 + 1.0 / (self.staleness + 1))

    def step_time(self, compute_s, num_workers, model_bytes, alpha, beta):
        """No barrier: a round lasts as long as the slower of a worker's cycle (compute, push its gradient,
        pull a model every τ+1 steps) and the server's one link, which carries all k pushes and pulls."""
        message = costmodel.message_time(model_bytes, alpha, beta)
        pulls = 1.0 / (self.staleness + 1)
        return max(compute_s + message * (1.0 + pulls), num_workers * message * (1.0 + pulls))

    def describe(self):
        """Strategy, staleness bound τ and delay model."""
        return {"strategy": self.name, "staleness": self.staleness, "delay": self.delay}
