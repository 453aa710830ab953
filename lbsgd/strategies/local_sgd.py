"""Local SGD and its family: workers step alone and average their models now and then.

Every worker keeps its own parameters x_i, optimizer state and BN statistics, and takes its own inner
step on the mean gradient of its own n examples (loss / n). After the local step of every H-th step
(``config.local_sgd.period``; after local steps H−1, 2H−1, …) the workers average (Stich 2019, "Local SGD
converges fast and communicates little"; Lin et al. 2020, "Don't use large mini-batches, use local SGD"):

    x̄ = Σ_i x_i / k,        x_i ← x̄,        one allreduce of the model every H steps.

* **Post-local SGD** (``post_local``; Lin et al. 2020): H = 1 until the step of ``switch_epoch``, H
  after it. H = 1 with ``momentum='local'`` is allreduce SGD (momentum is linear, so the average of the
  workers' steps is the step on the average gradient). Default switch: the first step-decay epoch (Lin
  et al.'s choice); with cosine or no decay, the middle of the decay phase, warmup + (epochs − warmup)/2,
  where the cosine rate has fallen to half its peak.
* **Hierarchical** (``group_size`` = g, ``global_period`` = H₂; Lin et al. 2020, PyTorch's
  HierarchicalModelAverager): groups of g consecutive workers average every H₁ = ``period`` steps, all k
  every H₂ steps (H₂ a multiple of H₁; a global average replaces the group one).
* **Outer optimizer** on the pseudo-gradient Δ = x₀ − x̄ at each global average, x₀ the model the
  workers started the round from (``outer``): ``average`` (x ← x̄), ``slowmo`` (Wang et al. 2020,
  SlowMo: u ← βu + Δ/γ, x ← x₀ − αγu, γ = the inner rate of the step), ``nesterov`` (Douillard et al.
  2023, DiLoCo: u ← μu + Δ, x ← x₀ − η_o(Δ + μu)). Evaluation uses x (the outer model), else x̄.
* **Inner optimizer** (``inner``): ``goyal`` — the run's optimizer (``lbsgd.optim``: Remarks 1 and 2)
  on the Goyal schedule for kn (Lin et al. use the large-batch rate; ``worker_lr='n'`` scales it to the
  rate for n examples instead); ``adamw`` — ``optax.adamw`` (DiLoCo's inner optimizer) whose rate is
  the run's schedule scaled to peak at ``adamw_lr``.
* At an average (group or global), each worker's momentum/Adam buffers are kept (``momentum='local'``),
  averaged alike (``average``) or zeroed (``reset``); step counters are kept. The BN running statistics
  are kept (``bn_stats='local'``) or averaged alike (``average``).

The step within a round is a function of the checkpointed step t, and the outer model, its momentum and
the consensus distance before the last global average are strategy state: a resumed run continues
exactly. Bytes and modelled time count one ring allreduce of the model every H (per level).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from lbsgd import costmodel, optim, stragglers
from lbsgd.parallel import mixing
from lbsgd.strategies import registry
from lbsgd.strategies.base import Strategy, local_steps

OUTERS = ("average", "slowmo", "nesterov")
INNERS = ("goyal", "adamw")
MOMENTA = ("local", "average", "reset")
BN_STATS = ("local", "average")
WORKER_LRS = ("kn", "n")
NONE, GROUP, GLOBAL = 0, 1, 2  # what happens after a step
# option -> (field, value) under which it applies; another value set with it is refused
APPLIES = {
    "slowmo_beta": ("outer", "slowmo"), "slowmo_alpha": ("outer", "slowmo"), "outer_lr": ("outer", "nesterov"),
    "outer_momentum": ("outer", "nesterov"), "adamw_lr": ("inner", "adamw"), "adamw_weight_decay": ("inner", "adamw"),
    "switch_epoch": ("post_local", True),
}


def _choice(name: str, value, choices) -> str | None:
    if value not in choices:
        return f"config.local_sgd.{name}={value!r} is unknown; use one of: {', '.join(map(str, choices))}"
    return None


@dataclasses.dataclass(frozen=True)
class LocalSGDOptions(registry.Options):
    """``config.local_sgd``: averaging period(s), post-local switch, outer and inner optimizer, what an
    average does to momentum and BN statistics, and the workers' learning rate."""

    period: int = 4  # H (H₁ with groups)
    group_size: int = 0  # g: hierarchical averaging in groups of g consecutive workers (0: off)
    global_period: int = 0  # H₂: all workers average every H₂ steps (hierarchical only)
    post_local: bool = False  # H = 1 until switch_epoch, then H
    switch_epoch: float = -1.0  # -1: the first step-decay epoch, or the middle of the cosine decay
    outer: str = "average"
    slowmo_beta: float = 0.5
    slowmo_alpha: float = 1.0
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    inner: str = "goyal"
    adamw_lr: float = 1e-3
    adamw_weight_decay: float = 1e-4
    momentum: str = "local"
    bn_stats: str = "local"
    worker_lr: str = "kn"

    def validate(self):
        """Counts, ranges, names, and options that only apply with another setting (Stich 2019; Lin et al. 2020)."""
        bad = {
            "period": not registry.is_count(self.period),
            "group_size": not registry.is_count(self.group_size, allow_zero=True) or self.group_size == 1,
            "global_period": not registry.is_count(self.global_period, allow_zero=True),
            "post_local": not isinstance(self.post_local, bool),
            "switch_epoch": not (self.switch_epoch == -1 or registry.is_number_in(self.switch_epoch, 0, math.inf)),
            "slowmo_beta": not registry.is_number_in(self.slowmo_beta, 0, 1) or self.slowmo_beta == 1,
            "slowmo_alpha": not registry.is_number_in(self.slowmo_alpha, 0, math.inf) or self.slowmo_alpha == 0,
            "outer_lr": not registry.is_number_in(self.outer_lr, 0, math.inf) or self.outer_lr == 0,
            "outer_momentum": not registry.is_number_in(self.outer_momentum, 0, 1) or self.outer_momentum == 1,
            "adamw_lr": not registry.is_number_in(self.adamw_lr, 0, math.inf) or self.adamw_lr == 0,
            "adamw_weight_decay": not registry.is_number_in(self.adamw_weight_decay, 0, 1),
        }
        rules = {
            "period": "a positive integer (steps between averages)", "group_size": "0 (off) or an integer >= 2",
            "global_period": "a non-negative integer", "post_local": "True or False",
            "switch_epoch": "-1 (automatic) or a number of epochs >= 0", "slowmo_beta": "a number in [0, 1)",
            "slowmo_alpha": "a number > 0", "outer_lr": "a number > 0", "outer_momentum": "a number in [0, 1)",
            "adamw_lr": "a number > 0", "adamw_weight_decay": "a number in [0, 1]",
        }
        for name, wrong in bad.items():
            if wrong:
                return f"config.local_sgd.{name}={getattr(self, name)!r} must be {rules[name]}"
        for name, choices in (("outer", OUTERS), ("inner", INNERS), ("momentum", MOMENTA), ("bn_stats", BN_STATS),
                              ("worker_lr", WORKER_LRS)):
            problem = _choice(name, getattr(self, name), choices)
            if problem:
                return problem
        return self._combinations()

    def _combinations(self) -> str | None:
        for name, (field, value) in APPLIES.items():
            default = type(self).__dataclass_fields__[name].default
            if getattr(self, name) != default and getattr(self, field) != value:
                return (f"config.local_sgd.{name} applies only with config.local_sgd.{field}={value!r}; "
                        f"drop it or set --config.local_sgd.{field}={value}")
        if self.group_size and (self.global_period < 2 * self.period or self.global_period % self.period):
            return (f"config.local_sgd.global_period={self.global_period} must be a multiple of "
                    f"config.local_sgd.period={self.period} greater than it (groups average every period steps, all "
                    f"workers every global_period)")
        if not self.group_size and self.global_period:
            return "config.local_sgd.global_period applies only with hierarchical averaging; set config.local_sgd.group_size"
        if self.worker_lr != "kn" and self.inner != "goyal":
            return "config.local_sgd.worker_lr='n' applies only with config.local_sgd.inner='goyal'"
        return None

    def validate_for(self, config):
        """Needs k and the epochs: g a divisor of k below it, the switch within the run."""
        k, g = config.num_workers, self.group_size
        if g and isinstance(k, int) and (g >= k or k % g):
            return (f"config.local_sgd.group_size={g} must divide config.num_workers={k} and be smaller "
                    f"(groups of g consecutive workers)")
        if self.post_local and switch_epoch_of(config, self) > config.num_epochs:
            return (f"config.local_sgd.switch_epoch={switch_epoch_of(config, self):g} is after the run's last epoch "
                    f"{config.num_epochs}; set --config.local_sgd.switch_epoch to at most {config.num_epochs}")
        return None


def switch_epoch_of(config, options: LocalSGDOptions) -> float:
    """Post-local SGD's switch epoch (Lin et al. 2020): as given, or the first step-decay epoch, or (cosine
    or no decay) the middle of the decay phase, warmup + (epochs − warmup) / 2."""
    if options.switch_epoch >= 0:
        return float(options.switch_epoch)
    if config.decay == "step" and len(config.decay_epochs):
        return float(min(config.decay_epochs))
    warmup = 0.0 if config.warmup == "none" else float(config.warmup_epochs)
    return warmup + (float(config.num_epochs) - warmup) / 2


def group_matrix(k: int, g: int) -> np.ndarray:
    """Block-diagonal k × k averaging of g consecutive workers (1/g in each g × g block)."""
    return np.kron(np.eye(k // g), np.full((g, g), 1.0 / g))


def _ring(k: int) -> float:
    """What one worker sends in a ring allreduce, per byte of the model: 2(k−1)/k."""
    return 2.0 * (k - 1) / k


@registry.register(
    "local_sgd",
    LocalSGDOptions,
    section="local_sgd",
    compare={
        "local_sgd H=4": ("local_sgd.period=4",),
        "local_sgd H=16": ("local_sgd.period=16",),
        "post-local H=16": ("local_sgd.period=16", "local_sgd.post_local=True"),
        "hierarchical g=4 H=4/16": ("local_sgd.period=4", "local_sgd.group_size=4", "local_sgd.global_period=16"),
        "slowmo H=8": ("local_sgd.period=8", "local_sgd.outer=slowmo"),
        "diloco H=16": ("local_sgd.period=16", "local_sgd.outer=nesterov", "local_sgd.inner=adamw", "local_sgd.adamw_lr=0.01"),
    },
)
@dataclasses.dataclass(frozen=True)
class LocalSGD(Strategy):
    """k workers step alone and average every ``period`` steps (hierarchically, post-local, with an outer
    optimizer: see the module docstring)."""

    per_worker = True
    options: LocalSGDOptions = LocalSGDOptions()
    num_workers: int = 1
    num_devices: int = 1
    switch_epoch: float = 0.0  # resolved (post-local only)
    switch_step: int = 0  # steps with H = 1 (post-local; ``bind``)
    switch_fraction: float = 0.0  # of the run's epochs before the switch (bytes, time)
    lr_ratio: float = 1.0  # worker_lr='n': the rate for n over the rate for kn
    peak_rate: float = 1.0  # the schedule's peak (adamw scales it to adamw_lr)
    schedule: Any = None  # the run's inner schedule (``bind``)

    @classmethod
    def from_config(cls, config, options, num_devices):
        """Options, k, d, the resolved switch epoch and the rate ratios of the run's schedule."""
        k, n = config.num_workers, config.per_worker_batch_size
        peak = optim.peak_learning_rate(config)
        ratio = 1.0
        if options.worker_lr == "n":
            rule, kw = config.lr_scaling, dict(noise_scale=float(config.b_noise), max_learning_rate=float(config.lr_max))
            ratio = optim.scaled_learning_rate(rule, config.base_learning_rate, n, config.base_batch_size, **kw) / peak
        switch = switch_epoch_of(config, options) if options.post_local else 0.0
        return cls(options=options, num_workers=k, num_devices=num_devices, switch_epoch=switch,
                   switch_fraction=min(switch / float(config.num_epochs), 1.0), lr_ratio=ratio, peak_rate=peak)

    def bind(self, schedule, steps_per_epoch):
        """The run's schedule, and the post-local switch in steps (first step at or after the epoch)."""
        return dataclasses.replace(self, schedule=schedule, switch_step=int(math.ceil(round(self.switch_epoch * steps_per_epoch, 6))))

    # -- the inner optimizer -----------------------------------------------------------------------
    def inner_tx(self, tx):
        """``tx`` (the run's Goyal optimizer) or AdamW on the run's schedule scaled to peak at ``adamw_lr``."""
        o = self.options
        if o.inner == "goyal":
            return tx
        scale = o.adamw_lr / self.peak_rate
        return optax.adamw(lambda t: scale * self.schedule(t), weight_decay=o.adamw_weight_decay)

    def inner_rate(self, step):
        """γ, the rate of the inner step ``step`` (SlowMo's scale)."""
        if self.options.inner == "adamw":
            return self.options.adamw_lr / self.peak_rate * self.schedule(step)
        return self.lr_ratio * self.schedule(step)

    # -- state -------------------------------------------------------------------------------------
    def init(self, params, tx, num_workers):
        """Per-worker copies and inner state; the outer model and momentum (outer optimizers only)."""
        stacked, opt_state, _ = super().init(params, self.inner_tx(tx), num_workers)
        extra = {"consensus": jnp.zeros((), jnp.float32)}
        if self.options.outer != "average":
            extra["outer"] = params
            extra["outer_momentum"] = jax.tree.map(jnp.zeros_like, params)
        return stacked, opt_state, extra

    def specs(self, params, opt_state, extra):
        """The strategy's own state is replicated."""
        p, o, _ = super().specs(params, opt_state, {})
        return p, o, jax.tree.map(lambda _: P(), extra)

    # -- when and how to average -------------------------------------------------------------------
    def level(self, step):
        """After local step t: ``NONE``, ``GROUP`` or ``GLOBAL`` average (the round is a function of t)."""
        o = self.options
        s = step + 1
        local = s - self.switch_step if o.post_local else s
        glob = (local % (o.global_period if o.group_size else o.period)) == 0
        if o.post_local:
            glob = glob | (local <= 0)
        group = (local % o.period == 0) & (o.group_size > 0)
        if o.post_local:
            group = group & (local > 0)
        return jnp.where(glob, GLOBAL, jnp.where(group, GROUP, NONE)).astype(jnp.int32)

    def global_mean(self, ctx, tree):
        """x̄ = Σ_i x_i / k of per-worker leaves [m, ...]: one allreduce; replicated leaves without the axis."""
        return jax.tree.map(lambda t: lax.psum(jnp.sum(t, axis=0), ctx.axis) / self.num_workers, tree)

    def average(self, ctx, tree, level):
        """Per-worker leaves after a ``GROUP`` (block matrix, ``lbsgd.parallel.mixing``) or ``GLOBAL`` average."""
        if level == GROUP:
            w = group_matrix(self.num_workers, self.options.group_size)
            return mixing.mix(tree, [mixing.plan(w, self.num_devices)], ctx.axis)
        m = ctx.workers_per_device
        return jax.tree.map(lambda mu: jnp.broadcast_to(mu, (m, *mu.shape)), self.global_mean(ctx, tree))

    def _buffers(self, opt_state):
        """(float buffers with a shape — momentum, Adam's moments —, the rest) of per-worker inner state."""
        leaves, treedef = jax.tree.flatten(opt_state)
        is_buffer = [jnp.issubdtype(x.dtype, jnp.floating) and x.ndim > 1 for x in leaves]
        return leaves, treedef, is_buffer

    def momentum_at(self, ctx, opt_state, level):
        """The inner state after an average: buffers kept, averaged alike, or zeroed; counters kept."""
        policy = self.options.momentum
        if policy == "local":
            return opt_state
        leaves, treedef, is_buffer = self._buffers(opt_state)
        buffers = [x for x, b in zip(leaves, is_buffer) if b]
        buffers = self.average(ctx, buffers, level) if policy == "average" else [jnp.zeros_like(x) for x in buffers]
        it = iter(buffers)
        return jax.tree.unflatten(treedef, [next(it) if b else x for x, b in zip(leaves, is_buffer)])

    def consensus(self, ctx, params, mean):
        """mean_i ‖x_i − x̄‖² / ‖x̄‖² over all leaves (``mixing.consensus_distance``), inside shard_map."""
        dev = sum(jnp.sum(jnp.square(x.astype(jnp.float32) - mu[None].astype(jnp.float32)))
                  for x, mu in zip(jax.tree.leaves(params), jax.tree.leaves(mean)))
        norm = sum(jnp.sum(jnp.square(mu.astype(jnp.float32))) for mu in jax.tree.leaves(mean))
        return lax.psum(dev, ctx.axis) / self.num_workers / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)

    def outer_step(self, ctx, mean, extra):
        """The model all workers continue from, and the outer state: x̄ (average), SlowMo (Wang et al. 2020)
        or DiLoCo's Nesterov step (Douillard et al. 2023) on Δ = x₀ − x̄."""
        o = self.options
        if o.outer == "average":
            return mean, {}
        x0, u = extra["outer"], extra["outer_momentum"]
        delta = jax.tree.map(lambda a, b: a - b, x0, mean)
        if o.outer == "slowmo":
            gamma = jnp.asarray(self.inner_rate(ctx.step), jnp.float32)
            gamma = jnp.where(gamma > 0, gamma, 1.0)
            u = jax.tree.map(lambda v, dl: o.slowmo_beta * v + dl / gamma, u, delta)
            x = jax.tree.map(lambda a, v: a - o.slowmo_alpha * gamma * v, x0, u)
        else:
            u = jax.tree.map(lambda v, dl: o.outer_momentum * v + dl, u, delta)
            x = jax.tree.map(lambda a, dl, v: a - o.outer_lr * (dl + o.outer_momentum * v), x0, delta, u)
        return x, {"outer": x, "outer_momentum": u}

    def _global(self, ctx, args):
        params, opt_state, extra = args
        mean = self.global_mean(ctx, params)
        x, outer = self.outer_step(ctx, mean, extra)
        m = ctx.workers_per_device
        params = jax.tree.map(lambda t, xi: jnp.broadcast_to(xi, (m, *xi.shape)).astype(t.dtype), params, x)
        extra = {**extra, **outer, "consensus": self.consensus(ctx, args[0], mean)}
        return params, self.momentum_at(ctx, opt_state, GLOBAL), extra

    def _group(self, ctx, args):
        params, opt_state, extra = args
        return self.average(ctx, params, GROUP), self.momentum_at(ctx, opt_state, GROUP), extra

    # -- the step (inside shard_map) ---------------------------------------------------------------
    def apply(self, ctx, tx, params, opt_state, extra, grad_params, grads):
        """x_i ← x_i + u_i (each worker's own inner step), then the average this step calls for."""
        updates, opt_state = local_steps(self.inner_tx(tx), grads, opt_state, params)
        if self.lr_ratio != 1.0:
            updates = jax.tree.map(lambda u: (self.lr_ratio * u).astype(u.dtype), updates)
        args = (optax.apply_updates(params, updates), opt_state, extra)
        group = (lambda a: self._group(ctx, a)) if self.options.group_size else (lambda a: a)
        return lax.switch(self.level(ctx.step), [lambda a: a, group, lambda a: self._global(ctx, a)], args)

    def mix_batch_stats(self, ctx, batch_stats):
        """``bn_stats='average'``: the running statistics are averaged with the models; else kept."""
        if self.options.bn_stats == "local" or not jax.tree.leaves(batch_stats):
            return batch_stats
        group = (lambda b: self.average(ctx, b, GROUP)) if self.options.group_size else (lambda b: b)
        return lax.switch(self.level(ctx.step), [lambda b: b, group, lambda b: self.average(ctx, b, GLOBAL)],
                          batch_stats)

    # -- reporting ---------------------------------------------------------------------------------
    def eval_params(self, params, extra):
        """The outer model (outer optimizers), else the workers' average x̄."""
        return extra["outer"] if self.options.outer != "average" else mixing.worker_mean(params)

    def bytes_by_level(self, num_workers, model_bytes) -> dict[str, float]:
        """Bytes one worker sends per step, per level: a ring allreduce of all k every H (H₂), of its group
        every H₁ but at the global rounds; post-local: H = 1 for the epochs before the switch."""
        o, f = self.options, self.switch_fraction
        h_glob = o.global_period if o.group_size else o.period
        glob = _ring(num_workers) * model_bytes * (f + (1 - f) / h_glob)
        out = {"global": glob}
        if o.group_size:
            out["group"] = _ring(o.group_size) * model_bytes * (1 - f) * (1 / o.period - 1 / o.global_period)
        return out

    def bytes_sent_per_worker_per_step(self, num_workers, model_bytes):
        """The sum over levels of ``bytes_by_level``."""
        return sum(self.bytes_by_level(num_workers, model_bytes).values())

    def step_time(self, compute_s, num_workers, model_bytes, alpha, beta):
        """Compute, plus one ring allreduce of the model every H steps per level (amortised per step)."""
        o, f = self.options, self.switch_fraction
        ring = lambda p: costmodel.ring_cost(p, model_bytes, alpha, beta, 0.0)["time_s"]  # noqa: E731
        h_glob = o.global_period if o.group_size else o.period
        t = ring(num_workers) * (f + (1 - f) / h_glob)
        if o.group_size:
            t += ring(o.group_size) * (1 - f) * (1 / o.period - 1 / o.global_period)
        if stragglers.per_worker(compute_s):  # stragglers: an average waits for the slowest of its workers
            run = dataclasses.replace(self, switch_step=round(f * len(compute_s))) if o.post_local else self
            levels = np.asarray(run.level(np.arange(len(compute_s))))
            groups = group_matrix(num_workers, o.group_size) if o.group_size else None
            sync = {NONE: (None, 0.0), GROUP: (groups, ring(o.group_size or 1)), GLOBAL: (stragglers.ALL, ring(num_workers))}
            return stragglers.run_time(compute_s, lambda s: sync[int(levels[s])])
        return compute_s + t

    def result_fields(self, extra, num_workers, model_bytes):
        """The consensus distance before the last global average, and the bytes of each level."""
        levels = self.bytes_by_level(num_workers, model_bytes)
        return {"consensus_distance_before_last_average": float(jax.device_get(extra["consensus"])),
                **{f"bytes_sent_per_worker_per_step_{name}": float(b) for name, b in levels.items()}}

    def describe(self):
        """Strategy and every option that applies (the resolved switch epoch for post-local SGD)."""
        o = self.options
        out = {"strategy": self.name, "period": o.period}
        if o.group_size:
            out.update(group_size=o.group_size, global_period=o.global_period)
        out.update(post_local=o.post_local)
        if o.post_local:
            out.update(switch_epoch=self.switch_epoch)
        out.update(outer=o.outer)
        if o.outer == "slowmo":
            out.update(slowmo_beta=o.slowmo_beta, slowmo_alpha=o.slowmo_alpha)
        if o.outer == "nesterov":
            out.update(outer_lr=o.outer_lr, outer_momentum=o.outer_momentum)
        out.update(inner=o.inner)
        if o.inner == "adamw":
            out.update(adamw_lr=o.adamw_lr, adamw_weight_decay=o.adamw_weight_decay)
        return {**out, "momentum_at_average": o.momentum, "bn_stats": o.bn_stats, "worker_lr": o.worker_lr}
