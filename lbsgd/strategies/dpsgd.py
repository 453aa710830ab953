"""Decentralized parallel SGD, D-PSGD (Lian et al. 2017, "Can decentralized algorithms outperform
centralized algorithms?").

Every worker keeps its own parameters x_i, its own optimizer state (the ``lbsgd.optim`` momentum
with the Remark 2 correction and Remark 1 weight decay) and its own BN statistics. Its gradient is the
mean over its own n examples (loss / n, not / kn), and the learning rate is the same Goyal schedule
as for the global minibatch kn: since the mixing matrix W is doubly stochastic and the optimizer is
linear in the gradient, the average model x̄ = Σ_i x_i / k moves exactly like allreduce SGD's
parameters would on the same gradients. The workers never sum over all k; each talks to its
neighbours in ``config.topology`` only.

Two forms (``config.dpsgd.form``), with u_i the optimizer update of worker i from the gradient at its
own pre-mix x_i:

* ``awc`` (adapt-while-combine, Lian et al.'s Algorithm 1): x_i ← Σ_j W_ij x_j + u_i. Mixing and
  gradient do not depend on each other, so communication can overlap computation.
* ``atc`` (adapt-then-combine): x_i ← Σ_j W_ij (x_j + u_j). On the ``complete`` topology this is
  allreduce SGD exactly (tested).

Topologies (``lbsgd.parallel.mixing``): ``ring`` (self, left, right, 1/3 each), ``exponential``
(i receives from i + 2⁰, 2¹, … < k, uniform weights), ``complete`` (1/k), ``one_peer_exponential``
(time-varying: at step t one peer at distance 2^(t mod ⌈log₂ k⌉), weights ½, as SGP uses).
A worker sends its parameters to its out-degree's worth of peers per step.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import optax

from lbsgd import costmodel, stragglers
from lbsgd.parallel import mixing
from lbsgd.strategies import registry
from lbsgd.strategies.base import Strategy, local_steps

FORMS = ("awc", "atc")
TOPOLOGIES = mixing.DOUBLY_STOCHASTIC_TOPOLOGIES
DEFAULT_TOPOLOGY = "ring"


@dataclasses.dataclass(frozen=True)
class DPSGDOptions(registry.Options):
    """``config.dpsgd``: ``form`` 'awc' (Lian et al.'s Algorithm 1) or 'atc' (adapt then combine)."""

    form: str = "awc"

    def validate(self):
        """``form`` is one of ``FORMS``."""
        if self.form not in FORMS:
            return f"config.dpsgd.form={self.form!r} is unknown; use one of: {', '.join(FORMS)}"
        return None


def mixing_pool(topology: str, k: int) -> list[np.ndarray]:
    """The mixing matrices of ``topology`` for k workers (one, or one per step in turn)."""
    if topology == "ring":
        return [mixing.ring_matrix(k)]
    if topology == "exponential":
        return [mixing.exponential_matrix(k)]
    if topology == "complete":
        return [mixing.complete_matrix(k)]
    if topology == "one_peer_exponential":
        return mixing.one_peer_exponential_pool(k)
    raise ValueError(f"unknown topology {topology!r}; use one of {', '.join(TOPOLOGIES)}")


@registry.register(
    "dpsgd",
    DPSGDOptions,
    section="dpsgd",
    topologies=TOPOLOGIES,  # the first, ring, is the default
    compare={
        "dpsgd ring": ("topology=ring",),
        "dpsgd exponential": ("topology=exponential",),
        "dpsgd complete": ("topology=complete",),
        "dpsgd one-peer-exp": ("topology=one_peer_exponential",),
    },
)
@dataclasses.dataclass(frozen=True)
class DPSGD(Strategy):
    """Each worker: own optimizer step, then (or while) averaging with its neighbours by W."""

    per_worker = True
    topology: str = DEFAULT_TOPOLOGY
    form: str = "awc"
    num_devices: int = 1
    num_workers: int = 1

    @property
    def pool(self) -> list[np.ndarray]:
        """The k × k mixing matrices, used in turn (t mod len)."""
        return mixing_pool(self.topology, self.num_workers)

    @classmethod
    def from_config(cls, config, options, num_devices):
        """Topology (default ring), form, k and d."""
        topology = registry.topology_of(config)
        return cls(topology=topology, form=options.form, num_devices=num_devices, num_workers=config.num_workers)

    def _plans(self):
        return [mixing.plan(w, self.num_devices) for w in self.pool]

    def mix(self, ctx, tree):
        """Σ_j W_ij x_j for this step's W."""
        plans = self._plans()
        return mixing.mix(tree, plans, ctx.axis, index=ctx.step % len(plans))

    def apply(self, ctx, tx, params, opt_state, extra, grad_params, grads):
        """AWC: mix(x) + u; ATC: mix(x + u)."""
        updates, opt_state = local_steps(tx, grads, opt_state, params)
        if self.form == "atc":
            return self.mix(ctx, optax.apply_updates(params, updates)), opt_state, extra
        return optax.apply_updates(self.mix(ctx, params), updates), opt_state, extra

    def bytes_sent_per_worker_per_step(self, num_workers, model_bytes):
        """Out-degree × model size (mean over the pool for a time-varying graph)."""
        return mixing.messages_per_worker(self.pool) * model_bytes

    def step_time(self, compute_s, num_workers, model_bytes, alpha, beta):
        """Out-degree messages of the model, one after another on the worker's link; overlapped with
        compute for ``awc`` (max), after it for ``atc`` (sum). Per-worker times [S, k] (stragglers): each
        worker's step waits for the previous step of the neighbours it receives from (W_ij ≠ 0)."""
        comm = mixing.messages_per_worker(self.pool) * costmodel.message_time(model_bytes, alpha, beta)
        if stragglers.per_worker(compute_s):
            pool = self.pool
            return stragglers.run_time(compute_s, lambda s: (pool[s % len(pool)], comm), overlap=self.form == "awc")
        return max(compute_s, comm) if self.form == "awc" else compute_s + comm

    def describe(self):
        """Strategy, topology and form."""
        return {"strategy": self.name, "topology": self.topology, "form": self.form}
