"""Alpha-beta-gamma cost model of allreduce: ring vs halving/doubling.

Goyal et al. (2017), §4 "Communication", choose recursive halving/doubling
over the ring ("bucket") algorithm for the inter-server allreduce because it
needs only 2*log2(p) rather than 2(p-1) latency-bound steps while moving the
same number of bytes. This module makes that argument quantitative with the
standard model (Thakur, Rabenseifner & Gropp 2005): sending one message of
n bytes costs ``alpha + n * beta`` and reducing n bytes costs ``n * gamma``.

For p workers and a message of b bytes (time on the critical path):

* ring:  2(p-1) steps, each sending b/p bytes per node
      T = 2(p-1) alpha + 2(p-1)/p b beta + (p-1)/p b gamma
* halving/doubling, p a power of two: 2 log2(p) steps
      T = 2 log2(p) alpha + 2(p-1)/p b beta + (p-1)/p b gamma
* halving/doubling, p not a power of two (q = largest power of two <= p;
  the pre/post step of ``lbsgd.parallel.aggregators``: the p-q extra ranks
  first send their whole buffer to a partner among the q, which adds it,
  and get the result back at the end): 2 log2(q) + 2 steps
      T = (2 log2(q) + 2) alpha + (2(q-1)/q + 2) b beta + ((q-1)/q + 1) b gamma

The formulas only: ``python -m lbsgd.commcost`` prints them as a table over p and writes a plot;
strategies use them for their modelled step time (``Strategy.step_time``).
Sizes: 1 MB here means 1 MiB = 2**20 bytes; bandwidth is in Gbit/s = 1e9 bit/s.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

MIB = 1 << 20

# Defaults, documented in the CLI help and in docs/aggregation.md:
DEFAULT_MESSAGE_MB = 100.0  # ResNet-50: ~25.6M float32 gradients ~ 100 MB.
DEFAULT_BANDWIDTH_GBIT = 50.0  # Goyal et al.'s 50 Gbit/s Ethernet.
# Per-message latency on a 50 GbE datacenter network: a few us for RDMA
# (RoCE) end to end, tens of us through the kernel TCP stack; 10 us is a
# middle value. It is a model parameter, not a measurement.
DEFAULT_LATENCY_US = 10.0
# Reduction throughput (gamma = 1 / this): ~10 GB/s, a memory-bound float32
# add on a CPU core (GPUs reduce far faster, making gamma negligible).
DEFAULT_REDUCE_GBYTE_S = 10.0


# Networks of the decentralized-SGD papers, for lbsgd.compare's time model: (Gbit/s, latency in us).
# Jin et al. 2016 train over 10 Gb Ethernet; Assran et al. 2019 compare 10 GbE with 100 Gb/s
# InfiniBand, and the FDR InfiniBand of many clusters runs at 56 Gb/s. The latencies are model
# parameters (TCP through the kernel vs RDMA), not measurements.
NETWORKS = {"10GbE": (10.0, 50.0), "IB56": (56.0, 5.0)}


def message_time(nbytes: float, alpha: float, beta: float) -> float:
    """One point-to-point message of ``nbytes``: alpha + nbytes * beta."""
    return alpha + nbytes * beta


def _check(p: int, nbytes: float) -> None:
    if int(p) != p or p < 1:
        raise ValueError(f"p must be a positive integer, got {p}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")


def is_power_of_two(p: int) -> bool:
    """True for p = 1, 2, 4, 8, ..."""
    return p >= 1 and p & (p - 1) == 0


def ring_cost(p: int, nbytes: float, alpha: float, beta: float, gamma: float) -> dict:
    """Ring allreduce cost (Goyal et al. §4's "bucket" algorithm).

    Reduce-scatter then all-gather around a ring: 2(p-1) steps, each node
    sending b/p bytes per step, so ``bytes_sent`` = 2(p-1)/p * b per node and
    (p-1)/p * b bytes reduced:
    ``time_s`` = 2(p-1) alpha + 2(p-1)/p b beta + (p-1)/p b gamma.
    Returns ``dict(steps, bytes_sent, bytes_reduced, time_s)``.
    """
    _check(p, nbytes)
    steps = 2 * (p - 1)
    sent = 2 * (p - 1) / p * nbytes
    reduced = (p - 1) / p * nbytes
    return dict(
        steps=steps, bytes_sent=sent, bytes_reduced=reduced, time_s=steps * alpha + sent * beta + reduced * gamma
    )


def halving_doubling_cost(p: int, nbytes: float, alpha: float, beta: float, gamma: float) -> dict:
    """Recursive halving/doubling allreduce cost (Goyal et al. §4).

    Power-of-two p: recursive-halving reduce-scatter (log2 p steps sending
    b/2, b/4, ... bytes) and recursive-doubling all-gather (log2 p steps):
    ``steps`` = 2 log2 p, ``bytes_sent`` = 2(p-1)/p * b per node,
    ``time_s`` = 2 log2(p) alpha + 2(p-1)/p b beta + (p-1)/p b gamma.

    Other p, with q the largest power of two <= p: one pre-step in which the
    p-q extra ranks send their whole buffer (b bytes, reduced by the
    receiver), halving/doubling on q ranks, and one post-step returning the
    result (b bytes): ``steps`` = 2 log2 q + 2, ``bytes_sent`` (critical
    path) = 2(q-1)/q b + 2b, ``time_s`` = (2 log2 q + 2) alpha
    + (2(q-1)/q + 2) b beta + ((q-1)/q + 1) b gamma.
    Returns ``dict(steps, bytes_sent, bytes_reduced, time_s)``.
    """
    _check(p, nbytes)
    q = 1 << (int(p).bit_length() - 1)
    steps = 2 * int(math.log2(q))
    sent = 2 * (q - 1) / q * nbytes
    reduced = (q - 1) / q * nbytes
    if q != p:
        steps += 2
        sent += 2 * nbytes
        reduced += nbytes
    return dict(
        steps=steps, bytes_sent=sent, bytes_reduced=reduced, time_s=steps * alpha + sent * beta + reduced * gamma
    )


COSTS: dict[str, Callable[..., dict]] = {
    "ring": ring_cost,
    "halving_doubling": halving_doubling_cost,
}


def model_params(
    bandwidth_gbit: float = DEFAULT_BANDWIDTH_GBIT,
    latency_us: float = DEFAULT_LATENCY_US,
    reduce_gbyte_s: float = DEFAULT_REDUCE_GBYTE_S,
):
    """(alpha [s], beta [s/byte], gamma [s/byte]) from network figures."""
    alpha = latency_us * 1e-6
    beta = 8.0 / (bandwidth_gbit * 1e9)
    gamma = 1.0 / (reduce_gbyte_s * 1e9) if reduce_gbyte_s > 0 else 0.0
    return alpha, beta, gamma


def hd_advantage(p: int, nbytes: float, alpha: float, beta: float, gamma: float) -> float:
    """ring time - halving/doubling time (> 0: halving/doubling wins)."""
    return (
        ring_cost(p, nbytes, alpha, beta, gamma)["time_s"]
        - halving_doubling_cost(p, nbytes, alpha, beta, gamma)["time_s"]
    )


def crossover(p_values: Iterable[int], nbytes: float, alpha: float, beta: float, gamma: float) -> int | None:
    """Smallest p in ``p_values`` from which halving/doubling beats the ring.

    Goyal et al. §4's regime: as p grows the ring's 2(p-1) alpha latency term
    dominates. Returns the smallest p such that halving/doubling is strictly
    faster at it and at every larger p in ``p_values`` (so non-powers of two,
    which pay the pre/post step, are taken into account), or None if it is
    not faster at the largest p.
    """
    ps = sorted(set(int(p) for p in p_values))
    best = None
    for p in reversed(ps):
        if hd_advantage(p, nbytes, alpha, beta, gamma) > 0:
            best = p
        else:
            break
    return best


def crossover_bytes(p: int, alpha: float, beta: float, gamma: float) -> float:
    """Message size below which halving/doubling beats the ring at p workers.

    The time difference is linear in b (``hd_advantage(b) = A + B*b``), so
    the crossover is b* = -A/B. Returns ``math.inf`` when halving/doubling
    is never slower (power-of-two p: equal bandwidth terms, fewer steps) and
    0.0 when it is never faster (e.g. p = 3).
    """
    a0 = hd_advantage(p, 0.0, alpha, beta, gamma)  # latency terms only
    slope = hd_advantage(p, 1.0, 0.0, beta, gamma)  # per-byte terms only
    if slope >= 0:
        return math.inf if a0 >= 0 else 0.0
    return max(0.0, -a0 / slope)
