"""Elastic averaging SGD, EASGD (Zhang, Choromanska & LeCun 2015), synchronous form as in Jin et al. 2016.

Every worker keeps its own parameters x_i and its own momentum (EAMSGD: each worker's local step is the
``lbsgd.optim`` step with Remarks 1 and 2, from the mean gradient over its own n examples, on the Goyal
schedule for the global kn). A centre variable x̃ is shared (one replicated copy). Every τ steps
(``config.easgd.period``; after local steps τ−1, 2τ−1, …), from the pre-exchange values,

    x_i ← x_i − α (x_i − x̃)        and        x̃ ← x̃ + α Σ_i (x_i − x̃),        α = β / k,

with β = ``config.easgd.beta`` (0.8 by default, the paper's choice of a moving rate independent of k).
Worker i's own optimizer update u_i (from the gradient at its pre-exchange x_i) is added to its
exchanged value, as in the paper's synchronous update. The elastic terms cancel in x̃ + Σ_i x_i, so
that sum changes only by Σ_i u_i. One collective per exchange: the allreduce of Σ_i (x_i − x̃).
Evaluation uses the centre, the model EASGD delivers; the workers' average is evaluated and logged too
(``eval_accuracy_worker_average``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from lbsgd import costmodel, stragglers
from lbsgd.parallel import mixing
from lbsgd.strategies import registry
from lbsgd.strategies.base import Strategy, local_steps


@dataclasses.dataclass(frozen=True)
class EASGDOptions(registry.Options):
    """``config.easgd``: moving rate α = ``beta`` / k, an exchange with the centre every ``period`` steps."""

    beta: float = 0.8
    period: int = 1

    def validate(self):
        """β in [0, 1]; τ a positive integer."""
        if not registry.is_number_in(self.beta, 0, 1):
            return f"config.easgd.beta={self.beta!r} must be a number in [0, 1] (the moving rate is beta / k)"
        if not registry.is_count(self.period):
            return f"config.easgd.period={self.period!r} must be a positive integer (steps between exchanges)"
        return None


@registry.register(
    "easgd",
    EASGDOptions,
    section="easgd",
    compare={"easgd tau=1": ("easgd.period=1",), "easgd tau=10": ("easgd.period=10",)},
)
@dataclasses.dataclass(frozen=True)
class EASGD(Strategy):
    """Workers pulled elastically towards a shared centre every ``period`` steps."""

    per_worker = True
    extra_eval_models = ("worker_average",)
    beta: float = 0.8
    period: int = 1
    num_workers: int = 1

    @classmethod
    def from_config(cls, config, options, num_devices):
        """β, τ and k."""
        return cls(beta=options.beta, period=options.period, num_workers=config.num_workers)

    @property
    def alpha(self) -> float:
        """The moving rate α = β / k."""
        return self.beta / self.num_workers

    def init(self, params, tx, num_workers):
        """Per-worker copies and momentum, and the centre x̃ = the common initial model."""
        stacked, opt_state, _ = super().init(params, tx, num_workers)
        return stacked, opt_state, {"center": params}

    def specs(self, params, opt_state, extra):
        """The centre is replicated; the rest as for any per-worker strategy."""
        p, o, _ = super().specs(params, opt_state, {})
        return p, o, {"center": jax.tree.map(lambda _: P(), extra["center"])}

    def apply(self, ctx, tx, params, opt_state, extra, grad_params, grads):
        """x_i ← x_i − α(x_i − x̃) + u_i and x̃ ← x̃ + α Σ_i (x_i − x̃) on exchange steps, else x_i ← x_i + u_i."""
        updates, opt_state = local_steps(tx, grads, opt_state, params)
        alpha = self.alpha

        def exchange(args):
            x, center = args
            diff = jax.tree.map(lambda xi, c: xi - c[None], x, center)
            total = lax.psum(jax.tree.map(lambda t: jnp.sum(t, axis=0), diff), ctx.axis)
            x = jax.tree.map(lambda xi, di: xi - alpha * di, x, diff)
            center = jax.tree.map(lambda c, t: c + alpha * t, center, total)
            return x, center

        now = (ctx.step + 1) % self.period == 0
        x, center = lax.cond(now, exchange, lambda args: args, (params, extra["center"]))
        return optax.apply_updates(x, updates), opt_state, {"center": center}

    def eval_params(self, params, extra):
        """The centre x̃."""
        return extra["center"]

    def extra_eval_params(self, name, params, extra):
        """``worker_average``: the mean of the workers' models."""
        if name != "worker_average":
            return super().extra_eval_params(name, params, extra)
        return mixing.worker_mean(params)

    def bytes_sent_per_worker_per_step(self, num_workers, model_bytes):
        """One allreduce of the model (2(k−1)/k of it per worker, as ring or halving/doubling) every τ steps."""
        return 2.0 * (num_workers - 1) / num_workers * model_bytes / self.period

    def step_time(self, compute_s, num_workers, model_bytes, alpha, beta):
        """Compute, plus one ring allreduce of the model every τ steps (amortised per step). Per-worker times
        [S, k] (stragglers): the workers run alone between exchanges, which wait for the slowest."""
        ring = costmodel.ring_cost(num_workers, model_bytes, alpha, beta, 0.0)["time_s"]
        if stragglers.per_worker(compute_s):
            period = self.period
            return stragglers.run_time(compute_s, lambda s: (stragglers.ALL, ring) if (s + 1) % period == 0 else (None, 0.0))
        return compute_s + ring / self.period

    def describe(self):
        """Strategy, β and period τ."""
        return {"strategy": self.name, "beta": self.beta, "period": self.period}
