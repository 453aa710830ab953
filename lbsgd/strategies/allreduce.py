"""Synchronous allreduce SGD (Goyal et al. 2017): one shared copy of the parameters.

Every worker's loss is Σ of its per-example losses / (k·n) (Remark 3); the k workers' gradients are
summed across devices with ``config.aggregation`` (``psum``, ``ring`` or ``halving_doubling``, §4,
``lbsgd.parallel.aggregators``), and every device then takes the same optimizer step on the same
shared parameters and optimizer state.
"""

from __future__ import annotations

import dataclasses

import optax

from lbsgd import costmodel, stragglers
from lbsgd.parallel import aggregators
from lbsgd.strategies import registry
from lbsgd.strategies.base import Strategy


@registry.register("allreduce")
@dataclasses.dataclass(frozen=True)
class Allreduce(Strategy):
    """Sum the gradients over all workers, one optimizer step on the shared copy (Goyal et al. §2–§4)."""

    per_worker = False
    supports_noise_scale = True
    supports_bn_groups = True
    uses_aggregation = True
    aggregation: str = "psum"
    bucket_mb: float = 25.0

    @classmethod
    def from_config(cls, config, options, num_devices):
        """``config.aggregation`` and ``config.bucket_mb``."""
        return cls(aggregation=config.aggregation, bucket_mb=float(config.bucket_mb))

    def reduce(self, ctx, grads):
        """The gradient of the whole minibatch: Σ over devices of this device's workers' summed gradients."""
        return aggregators.allreduce_sum(grads, ctx.axis, method=self.aggregation, bucket_mb=self.bucket_mb)

    def apply(self, ctx, tx, params, opt_state, extra, grad_params, summed):
        """One optimizer step of ``tx`` on the shared copy with the summed gradient (Remark 3)."""
        updates, opt_state = tx.update(summed, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, extra

    def bytes_sent_per_worker_per_step(self, num_workers, model_bytes):
        """2(k−1)/k of the gradient: what ring and halving/doubling send per worker (``lbsgd.commcost``)."""
        return 2.0 * (num_workers - 1) / num_workers * model_bytes

    def step_time(self, compute_s, num_workers, model_bytes, alpha, beta):
        """Compute, then the gradient allreduce (ring or halving/doubling by ``aggregation``; psum is
        modelled as ring). Per-worker times [S, k] (stragglers): every step waits for the slowest worker."""
        cost = costmodel.COSTS.get(self.aggregation, costmodel.ring_cost)
        comm = cost(num_workers, model_bytes, alpha, beta, 0.0)["time_s"]
        if stragglers.per_worker(compute_s):
            return stragglers.run_time(compute_s, lambda s: (stragglers.ALL, comm))
        return compute_s + comm

    def describe(self):
        """Strategy name and aggregation algorithm."""
        return {"strategy": self.name, "aggregation": self.aggregation}
