"""Gossip SGD: each worker talks to one peer per step (Jin et al. 2016, "How to scale distributed deep
learning?"; push-sum as in Assran et al. 2019, Stochastic Gradient Push).

As in D-PSGD (``lbsgd.strategies.dpsgd``) every worker keeps its own parameters, optimizer state
(``lbsgd.optim`` momentum with Remarks 1 and 2) and BN statistics, its gradient is the mean over its
own n examples, and the learning rate follows the Goyal schedule for the global kn.

``gossip_pull`` — every step every worker averages with one peer, x_i ← (x_i + x_σ(i)) / 2, and then
takes its local step from there (the gradient is taken at the averaged x_i). **How "random" is
realised with static collectives:** σ is a derangement (a permutation without fixed points) drawn
from a pool of ``config.gossip.pool_size`` derangements that are sampled uniformly once from
``config.seed``; at step t the pool entry ``randint(fold_in(seed, t))`` is used on every device. So
(i) each worker's peer is uniformly distributed over the other k−1 workers at every step (over
the draw of the pool and of the step's entry), (ii) no
two workers pull the same peer in one step (σ is a permutation: every worker is pulled exactly once,
which keeps the average of the models exact, unlike independent draws), and (iii) the sequence of
peer assignments is i.i.d. over the pool, not over all derangements; with the default pool of 32 and
k ≤ 16 this is far more variety than a run needs. The same (seed, step) gives the same peers on
any layout. Each worker sends its model to one peer per step.

``gossip_push`` — push-sum (Kempe et al. 2003; SGP): each worker keeps (x_i, w_i), w_i = 1 at the
start. It takes its gradient at the de-biased z_i = x_i / w_i, adds its optimizer update to x_i,
then keeps half of (x_i, w_i) and pushes the other half to one peer. With ``topology='random'`` every
worker picks its target independently and uniformly among the others (several may push to the same
worker; a pool as above), so W is column stochastic only: Σ_i x_i and Σ_i w_i = k are conserved while
the w_i spread, and z_i converges to the average. With ``topology='one_peer_exponential'`` (SGP)
worker j pushes to j + 2^(t mod ⌈log₂ k⌉): a permutation, so w_i stays 1. One message of the model
plus one scalar per worker per step. Evaluation uses the mean of the z_i.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lbsgd import costmodel, stragglers
from lbsgd.parallel import mixing
from lbsgd.strategies import registry
from lbsgd.strategies.base import Strategy, local_steps, per_worker_values

PULL_TOPOLOGIES = (mixing.RANDOM,)
PUSH_TOPOLOGIES = (mixing.RANDOM, "one_peer_exponential")
DEFAULT_TOPOLOGY = mixing.RANDOM


@dataclasses.dataclass(frozen=True)
class GossipOptions(registry.Options):
    """``config.gossip``: ``pool_size`` seeded random peer assignments to draw from (both gossip forms)."""

    pool_size: int = 32

    def validate(self):
        """``pool_size`` is a positive integer."""
        if not registry.is_count(self.pool_size):
            return f"config.gossip.pool_size={self.pool_size!r} must be a positive integer"
        return None


def pool_index(seed: int, step, pool_size: int):
    """The pool entry used at ``step``: uniform, a function of (seed, step) only (same on every device)."""
    return jax.random.randint(jax.random.fold_in(jax.random.PRNGKey(seed), step), (), 0, pool_size)


@dataclasses.dataclass(frozen=True)
class _Gossip(Strategy):
    per_worker = True
    topology: str = DEFAULT_TOPOLOGY
    pool_size: int = 32
    seed: int = 0
    num_devices: int = 1
    num_workers: int = 1

    @classmethod
    def from_config(cls, config, options, num_devices):
        """Topology (default random), pool size, seed, k and d."""
        return cls(
            topology=registry.topology_of(config),
            pool_size=int(options.pool_size),
            seed=int(config.seed),
            num_devices=num_devices,
            num_workers=config.num_workers,
        )

    @property
    def pool(self) -> list[np.ndarray]:
        """The k × k mixing matrices this strategy draws from."""
        raise NotImplementedError

    def neighbour_time(self, compute_s, comm: float) -> float:
        """compute + comm; with per-worker times [S, k], each worker waits for the previous step of the peers
        it receives from (the pool's matrices taken in turn: the expected wait of seeded draws)."""
        if stragglers.per_worker(compute_s):
            pool = self.pool
            return stragglers.run_time(compute_s, lambda s: (pool[s % len(pool)], comm))
        return compute_s + comm

    def mix(self, ctx, tree):
        """Apply this step's matrix of the pool."""
        plans = [mixing.plan(w, self.num_devices) for w in self.pool]
        if self.topology == mixing.RANDOM:
            index = pool_index(self.seed, ctx.step, len(plans))
        else:
            index = ctx.step % len(plans)
        return mixing.mix(tree, plans, ctx.axis, index=index)

    def describe(self):
        """Strategy, topology and pool size."""
        return {"strategy": self.name, "topology": self.topology, "pool_size": self.pool_size}


@registry.register(
    "gossip_pull", GossipOptions, section="gossip", topologies=PULL_TOPOLOGIES, compare={"gossip pull": ()}
)
@dataclasses.dataclass(frozen=True)
class GossipPull(_Gossip):
    """x_i ← (x_i + x_σ(i)) / 2 with σ a seeded random derangement, then the local step from there."""

    @property
    def pool(self):
        """``pool_size`` matrices ½(I + P_σ), σ random derangements of the k workers."""
        return mixing.pull_pool(self.num_workers, self.pool_size, self.seed)

    def prepare(self, ctx, params, extra):
        """Average with the peer first: the gradient is taken at the averaged model."""
        return self.mix(ctx, params)

    def apply(self, ctx, tx, params, opt_state, extra, grad_params, grads):
        """The local optimizer step from the averaged model."""
        updates, opt_state = local_steps(tx, grads, opt_state, grad_params)
        return optax.apply_updates(grad_params, updates), opt_state, extra

    def bytes_sent_per_worker_per_step(self, num_workers, model_bytes):
        """One model per worker per step (every worker is pulled by exactly one peer)."""
        return mixing.messages_per_worker(self.pool) * model_bytes

    def step_time(self, compute_s, num_workers, model_bytes, alpha, beta):
        """The pulled model must arrive before the forward pass: compute + one message. Per-worker times
        [S, k] (stragglers): ``neighbour_time``."""
        return self.neighbour_time(compute_s, costmodel.message_time(model_bytes, alpha, beta))


def _scale(tree, w):
    """Multiply every per-worker leaf [m, ...] by the per-worker scalar w [m]."""
    return jax.tree.map(lambda t: t * per_worker_values(w, t).astype(t.dtype), tree)


@registry.register(
    "gossip_push",
    GossipOptions,
    section="gossip",
    topologies=PUSH_TOPOLOGIES,
    compare={"gossip push": ("topology=random",), "gossip push one-peer-exp": ("topology=one_peer_exponential",)},
)
@dataclasses.dataclass(frozen=True)
class GossipPush(_Gossip):
    """Push-sum SGD: gradient at z_i = x_i / w_i, step on x_i, keep half of (x_i, w_i), push half."""

    @property
    def pool(self):
        """Random independent push targets, or the one-peer exponential graph in push form."""
        if self.topology == "one_peer_exponential":
            return mixing.push_one_peer_exponential_pool(self.num_workers)
        return mixing.push_pool(self.num_workers, self.pool_size, self.seed)

    def init_extra(self, num_workers):
        """The push-sum weights w_i = 1."""
        return {"weight": jnp.ones((num_workers,), jnp.float32)}

    def prepare(self, ctx, params, extra):
        """The de-biased model z_i = x_i / w_i."""
        return _scale(params, 1.0 / extra["weight"])

    def apply(self, ctx, tx, params, opt_state, extra, grad_params, grads):
        """x_i += u_i(z_i); then (x, w) ← W (x, w) in one message per worker."""
        updates, opt_state = local_steps(tx, grads, opt_state, grad_params)
        x = optax.apply_updates(params, updates)
        x, weight = self.mix(ctx, (x, extra["weight"]))
        return x, opt_state, {"weight": weight}

    def eval_params(self, params, extra):
        """The mean of the de-biased models z_i."""
        return mixing.worker_mean(self.worker_params(params, extra))

    def worker_params(self, params, extra):
        """z_i = x_i / w_i."""
        return _scale(params, 1.0 / extra["weight"])

    def bytes_sent_per_worker_per_step(self, num_workers, model_bytes):
        """One model plus one float32 weight per worker per step."""
        return mixing.messages_per_worker(self.pool) * (model_bytes + 4)

    def step_time(self, compute_s, num_workers, model_bytes, alpha, beta):
        """Compute, then push one message (model + weight); the next step needs what was received (per-worker
        times [S, k]: ``neighbour_time``)."""
        return self.neighbour_time(compute_s, costmodel.message_time(model_bytes + 4, alpha, beta))
