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
  ``delay='simulated'``: when an event-driven simulation of the server says so (``lbsgd.stragglers``):
  each worker loops pull → compute → push with seeded lognormal compute times of coefficient of variation
  ``config.async_ps.straggler_cv`` (or the measured ``config.async_ps.straggler_trace``), the server applies
  gradients one at a time in push order, and worker i refreshes after round t when it pulled during it
  (rounds of k updates; τ is unused). The table of pulls is computed on the host once per run, a function
  of (seed, step, worker) only, and indexed by the step inside the jitted step: the same on any layout.

With τ = 0 every worker pulls every step: allreduce SGD exactly (tested). Each step logs the mean and
maximum staleness of the gradients applied (``train_staleness_mean``, ``train_staleness_max``).

What this models: bounded, deterministic or seeded-random delays between a worker's pull and the
gradient it contributes, with every worker contributing once per round. What it does not: updates
applied one worker at a time (the server applies a round's k gradients together), lock-free races
inside a parameter update (Hogwild-style torn reads), workers that contribute at different rates (with
'simulated', a slow worker's pulls are late, but it still contributes one gradient a round), and the
server's own bandwidth limit (that is in the time model of ``lbsgd.compare``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from lbsgd import costmodel, stragglers
from lbsgd.errors import ConfigError
from lbsgd.parallel import aggregators
from lbsgd.parallel.layout import AXIS
from lbsgd.strategies import registry
from lbsgd.strategies.base import Strategy, per_worker_values

DELAYS = ("fixed", "random", "simulated")


@dataclasses.dataclass(frozen=True)
class AsyncPSOptions(registry.Options):
    """``config.async_ps``: gradients up to ``staleness`` server steps old; pulls 'fixed', 'random' or
    'simulated' (from compute times of coefficient of variation ``straggler_cv``, or ``straggler_trace``)."""

    staleness: int = 0
    delay: str = "fixed"
    straggler_cv: float = 0.5
    straggler_trace: str = ""

    def validate(self):
        """τ an integer >= 0; ``delay`` one of ``DELAYS``; the straggler CV a number >= 0; a readable trace."""
        if not registry.is_count(self.staleness, allow_zero=True):
            return f"config.async_ps.staleness={self.staleness!r} must be an integer >= 0"
        if self.delay not in DELAYS:
            return f"config.async_ps.delay={self.delay!r} is unknown; use one of: {', '.join(DELAYS)}"
        if stragglers.check_cv(self.straggler_cv):
            return f"config.async_ps.straggler_cv={self.straggler_cv!r} must be a finite number >= 0 (0: no stragglers)"
        if self.straggler_trace:
            try:
                stragglers.load_trace(self.straggler_trace)
            except ConfigError as e:
                return f"config.async_ps.straggler_trace: {e}"
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
    straggler_cv: float = 0.5
    straggler_trace: str = ""
    num_steps: int = 0  # steps of the run ('simulated': rows of the pull table; set by ``bind``)
    num_epochs: int = 0
    max_steps: int = 0

    @classmethod
    def from_config(cls, config, options, num_devices):
        """τ, delay model, seed, k, and the straggler model and run length of 'simulated'."""
        return cls(
            staleness=options.staleness, delay=options.delay, seed=int(config.seed), num_workers=config.num_workers,
            straggler_cv=float(options.straggler_cv), straggler_trace=options.straggler_trace,
            num_epochs=int(config.get("num_epochs", 0)), max_steps=int(config.get("max_steps", 0)),
        )

    def bind(self, schedule, steps_per_epoch):
        """The run's step count (``num_epochs`` × steps per epoch, at most ``max_steps``) for 'simulated'."""
        total = self.num_epochs * steps_per_epoch
        if self.max_steps > 0:
            total = min(total, self.max_steps) if total else self.max_steps
        return dataclasses.replace(self, num_steps=total) if total else self

    def refresh_table(self) -> np.ndarray:
        """'simulated': [steps, k] bool, worker i pulls after step t (``lbsgd.stragglers.refresh_table``)."""
        return _refresh_table(self.seed, self.num_workers, self.straggler_cv, self.straggler_trace,
                              max(self.num_steps, 1))

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
        if self.delay == "simulated":
            table = jnp.asarray(self.refresh_table())
            pull = table[jnp.minimum(ctx.step, table.shape[0] - 1), workers]
        elif self.delay == "random":
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

    @property
    def pulls_per_step(self) -> float:
        """Models pulled per worker and step: every τ+1 steps on average; every cycle when 'simulated'."""
        return 1.0 if self.delay == "simulated" else 1.0 / (self.staleness + 1)

    def bytes_sent_per_worker_per_step(self, num_workers, model_bytes):
        """A gradient pushed every step plus a model pulled every τ+1 steps on average."""
        return model_bytes * (1.0 + self.pulls_per_step)

    def step_time(self, compute_s, num_workers, model_bytes, alpha, beta):
        """No barrier: a round lasts as long as the slower of a worker's cycle (compute, push its gradient,
        pull a model every τ+1 steps) and the server's one link, which carries all k pushes and pulls. With
        per-worker times [S, k] (stragglers): the event-driven server of ``lbsgd.stragglers.simulate_ps``,
        the time until it has applied S·k gradients, divided by S (or the link bound, if slower)."""
        message = costmodel.message_time(model_bytes, alpha, beta)
        pulls = self.pulls_per_step
        link = num_workers * message * (1.0 + pulls)
        if stragglers.per_worker(compute_s):
            cycle = message * (1.0 + pulls)
            table = compute_s + cycle
            rows = lambda j: np.resize(table, (j, table.shape[1])) if j > len(table) else table[:j]
            steps = len(table)
            return max(stragglers.simulate_ps(rows, steps * num_workers).run_time() / steps, link)
        return max(compute_s + message * (1.0 + pulls), link)

    def describe(self):
        """Strategy, staleness bound τ and delay model (and the straggler model of 'simulated')."""
        out = {"strategy": self.name, "staleness": self.staleness, "delay": self.delay}
        if self.delay == "simulated":
            out.update(straggler_cv=self.straggler_cv, straggler_trace=self.straggler_trace)
        return out


@functools.lru_cache(maxsize=8)
def _refresh_table(seed: int, k: int, cv: float, trace_path: str, steps: int) -> np.ndarray:
    """The simulated server's pulls for k workers and ``steps`` rounds (compute times of mean 1, no
    communication: only their ratios order the events)."""
    trace = stragglers.load_trace(trace_path) if trace_path else None

    def cycles(j):
        return stragglers.compute_times(j, k, 1.0, cv, seed, trace)

    return stragglers.refresh_table(stragglers.simulate_ps(cycles, steps * k), steps)
