"""Neighbour mixing of per-worker state: topologies, their mixing matrices, and a collective plan.

Decentralized SGD (Lian et al. 2017, D-PSGD; Jin et al. 2016, gossip SGD; Assran et al. 2019,
Stochastic Gradient Push) never sums all k workers. Each step worker i replaces its state by a
weighted combination of a few workers' states,

    y_i = Σ_j W_ij x_j,        (W is k × k, row i = what worker i receives)

with W doubly stochastic for D-PSGD and gossip pull (the average Σ_i x_i / k is preserved) and
column stochastic for push-sum (Σ_i x_i is preserved; Kempe et al. 2003).

The k workers live m = k/d to a device on a 1-D mesh (worker i on device i // m, local row i % m).
``plan(W, d)`` turns a static W into collectives: rows needed from the device itself are combined
locally; for every device offset δ with any non-zero block, each device sends exactly the rows its
receiver needs (one ``lax.ppermute`` per offset, one message per offset, never an all-gather of all k
models) and the receiver weights them in. ``mix`` runs a plan inside ``jax.shard_map``; a
time-varying topology is a pool of plans chosen per step with ``lax.switch`` (every device picks the
same branch: the choice is a function of (seed, step) only, so any layout draws the same).

This module knows workers, meshes and pytrees, never a model or a dataset.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Topologies by strategy family; the strategies module says which one each strategy accepts.
DOUBLY_STOCHASTIC_TOPOLOGIES = ("ring", "exponential", "complete", "one_peer_exponential")
RANDOM = "random"

# Fewest workers each topology needs (ring: two distinct neighbours; one peer: another worker).
MIN_WORKERS = {"ring": 3, "exponential": 2, "complete": 1, "one_peer_exponential": 2, RANDOM: 2}


def num_exponential_peers(k: int) -> int:
    """⌈log₂ k⌉: the number of distances 2⁰, 2¹, … that are < k."""
    return max(0, math.ceil(math.log2(k))) if k > 1 else 0


def ring_matrix(k: int) -> np.ndarray:
    """Ring: worker i averages itself and its left and right neighbours, 1/3 each (k ≥ 3)."""
    w = np.zeros((k, k))
    for i in range(k):
        for j in (i - 1, i, i + 1):
            w[i, j % k] += 1.0 / 3.0
    return w


def exponential_matrix(k: int) -> np.ndarray:
    """Static exponential graph: worker i receives from i + 2⁰, i + 2¹, … (< k, mod k) and itself, uniform weights."""
    w = np.zeros((k, k))
    peers = [2**j for j in range(num_exponential_peers(k))]
    for i in range(k):
        for s in [0, *peers]:
            w[i, (i + s) % k] += 1.0 / (1 + len(peers))
    return w


def complete_matrix(k: int) -> np.ndarray:
    """Complete graph: every worker averages all k (W = 11ᵀ/k)."""
    return np.full((k, k), 1.0 / k)


def one_peer_exponential_pool(k: int) -> list[np.ndarray]:
    """Time-varying one-peer exponential graph (as in SGP): at step t worker i averages, ½ each, with
    worker i + 2^(t mod ⌈log₂ k⌉). Returns the ⌈log₂ k⌉ matrices, used in turn."""
    pool = []
    for j in range(num_exponential_peers(k)):
        w = 0.5 * np.eye(k)
        for i in range(k):
            w[i, (i + 2**j) % k] += 0.5
        pool.append(w)
    return pool


def random_derangements(k: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` permutations σ of range(k) with σ(i) ≠ i, drawn uniformly from ``seed`` (rejection)."""
    rng = np.random.default_rng([seed, 0x6055])
    out = []
    while len(out) < count:
        sigma = rng.permutation(k)
        if np.all(sigma != np.arange(k)):
            out.append(sigma)
    return out


def pull_pool(k: int, count: int, seed: int) -> list[np.ndarray]:
    """Random pull gossip: x_i ← (x_i + x_σ(i)) / 2 for a random derangement σ; ``count`` of them.

    Each matrix is doubly stochastic (σ is a permutation), so the average is preserved exactly.
    """
    return [0.5 * (np.eye(k) + np.eye(k)[sigma]) for sigma in random_derangements(k, count, seed)]


def push_pool(k: int, count: int, seed: int) -> list[np.ndarray]:
    """Random push-sum: every worker j keeps half and pushes half to a peer t(j) ≠ j drawn uniformly and
    independently (several may push to the same worker). Column stochastic, not doubly stochastic."""
    rng = np.random.default_rng([seed, 0x9054])
    pool = []
    for _ in range(count):
        w = 0.5 * np.eye(k)
        for j in range(k):
            t = (j + 1 + rng.integers(k - 1)) % k  # uniform over the other k - 1 workers
            w[t, j] += 0.5
        pool.append(w)
    return pool


def push_one_peer_exponential_pool(k: int) -> list[np.ndarray]:
    """Push form of the one-peer exponential graph: worker j pushes half to j + 2^(t mod ⌈log₂ k⌉).

    The push targets form a permutation, so these matrices are doubly stochastic and push-sum weights
    stay 1 (SGP's observation); the random push pool exercises the general case.
    """
    return [w.T.copy() for w in one_peer_exponential_pool(k)]


def second_largest_eigenvalue_modulus(w: np.ndarray) -> float:
    """ρ = the second-largest |eigenvalue| of W: consensus error shrinks like ρᵗ (W normal, e.g. circulant)."""
    ev = np.sort(np.abs(np.linalg.eigvals(w)))[::-1]
    return float(ev[1]) if len(ev) > 1 else 0.0


def messages_per_worker(pool: list[np.ndarray]) -> float:
    """Mean number of other workers each worker's state is sent to per step (off-diagonal non-zeros / k)."""
    k = pool[0].shape[0]
    return float(np.mean([np.count_nonzero(w - np.diag(np.diag(w))) / k for w in pool]))


# --------------------------------------------------------------------------
# the collective plan of one static W on d devices
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Transfer:
    """Rows that every device sends to the device δ positions before it (it receives from δ after)."""

    delta: int
    send_rows: np.ndarray  # [d, R] int: local rows device s sends (row 0 with weight 0 pads)
    recv_weights: np.ndarray  # [d, m, R]: weight of received row r in the receiver's local row w


@dataclasses.dataclass(frozen=True)
class MixingPlan:
    """A static W (k × k) laid out on d devices of m workers each."""

    matrix: np.ndarray
    num_devices: int
    local_weights: np.ndarray  # [d, m, m]: weights of the device's own rows
    transfers: tuple[Transfer, ...]

    @property
    def rows_sent_per_device(self) -> int:
        """Worker states each device sends per application (Σ over offsets of the padded row count)."""
        return sum(t.send_rows.shape[1] for t in self.transfers)


def plan(w: np.ndarray, num_devices: int) -> MixingPlan:
    """Lay out the k × k mixing matrix ``w`` on ``num_devices`` devices (d | k).

    For each device offset δ = 1 … d-1 the receiver dev needs, from device (dev + δ) mod d, the rows
    with a non-zero weight in its block; every device sends exactly those (padded to the largest such
    count over devices), by one ``ppermute``. Offsets whose blocks are all zero send nothing.
    """
    w = np.asarray(w, np.float64)
    k = w.shape[0]
    d = num_devices
    if w.shape != (k, k) or k % d:
        raise ValueError(f"mixing matrix of shape {w.shape} cannot be laid out on {d} devices")
    m = k // d
    blocks = w.reshape(d, m, d, m)  # [dev, w, src_dev, j]
    local = np.stack([blocks[dev, :, dev, :] for dev in range(d)]).astype(np.float32)
    transfers = []
    for delta in range(1, d):
        needs = []
        for dev in range(d):
            block = blocks[dev, :, (dev + delta) % d, :]
            needs.append(np.flatnonzero(np.any(block != 0, axis=0)))
        r = max(len(x) for x in needs)
        if r == 0:
            continue
        rows = np.zeros((d, r), np.int32)  # indexed by the receiver
        weights = np.zeros((d, m, r), np.float32)
        for dev in range(d):
            src = (dev + delta) % d
            rows[dev, : len(needs[dev])] = needs[dev]
            block = blocks[dev, :, src, :]  # [m, m]
            weights[dev, :, : len(needs[dev])] = block[:, needs[dev]]
        send_rows = np.stack([rows[(s - delta) % d] for s in range(d)])  # indexed by the sender
        transfers.append(Transfer(delta=delta, send_rows=send_rows, recv_weights=weights))
    return MixingPlan(matrix=w, num_devices=d, local_weights=local, transfers=tuple(transfers))


def _mix_buffer(buf, p: MixingPlan, axis_name: str):
    """y = W x for one [m, P] buffer of this device's rows (inside shard_map)."""
    d = p.num_devices
    dev = lax.axis_index(axis_name) if d > 1 else 0
    hi = lax.Precision.HIGHEST
    x = buf.astype(jnp.float32)
    y = jnp.einsum("wv,vp->wp", jnp.asarray(p.local_weights)[dev], x, precision=hi)
    for t in p.transfers:
        send = x[jnp.asarray(t.send_rows)[dev]]
        recv = lax.ppermute(send, axis_name, perm=[(s, (s - t.delta) % d) for s in range(d)])
        y = y + jnp.einsum("wr,rp->wp", jnp.asarray(t.recv_weights)[dev], recv, precision=hi)
    return y.astype(buf.dtype)


def _pack(tree):
    """Per-worker leaves [m, ...] -> one [m, P] buffer per dtype, plus what is needed to unpack."""
    leaves, treedef = jax.tree.flatten(tree)
    groups: dict = {}
    for i, leaf in enumerate(leaves):
        groups.setdefault(jnp.dtype(leaf.dtype), []).append(i)
    buffers = {dt: jnp.concatenate([leaves[i].reshape(leaves[i].shape[0], -1) for i in idx], axis=1)
               for dt, idx in groups.items()}
    return buffers, (leaves, treedef, groups)


def _unpack(buffers, meta):
    leaves, treedef, groups = meta
    out = list(leaves)
    for dt, idx in groups.items():
        offset = 0
        for i in idx:
            size = int(np.prod(leaves[i].shape[1:], dtype=np.int64))
            out[i] = buffers[dt][:, offset : offset + size].reshape(leaves[i].shape)
            offset += size
    return jax.tree.unflatten(treedef, out)


def mix(tree, plans: list[MixingPlan], axis_name: str, index=None):
    """Apply y_i = Σ_j W_ij x_j to a pytree of per-worker leaves (leading axis m), inside ``shard_map``.

    ``plans`` is a pool of static plans; with more than one, ``index`` (a traced integer, equal on every
    device) selects the one used this step via ``lax.switch``. All leaves of one dtype travel in one
    buffer: one message per device offset, whatever the number of leaves.
    """
    if not jax.tree.leaves(tree):
        return tree
    buffers, meta = _pack(tree)

    def apply(p):
        return lambda bufs: {dt: _mix_buffer(b, p, axis_name) for dt, b in bufs.items()}

    if len(plans) == 1:
        mixed = apply(plans[0])(buffers)
    else:
        mixed = lax.switch(index, [apply(p) for p in plans], buffers)
    return _unpack(mixed, meta)


def worker_mean(tree):
    """x̄ = mean over the leading worker axis of every leaf (works on global, sharded arrays)."""
    return jax.tree.map(lambda t: jnp.mean(t, axis=0), tree)


def consensus_distance(tree):
    """Mean over workers of ‖x_i − x̄‖² / ‖x̄‖² over all leaves together (0 when all workers agree)."""
    mean = worker_mean(tree)
    dev = sum(jnp.sum(jnp.square(t.astype(jnp.float32) - mu[None].astype(jnp.float32)))
              for t, mu in zip(jax.tree.leaves(tree), jax.tree.leaves(mean)))
    norm = sum(jnp.sum(jnp.square(mu.astype(jnp.float32))) for mu in jax.tree.leaves(mean))
    k = jax.tree.leaves(tree)[0].shape[0]
    return dev / k / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)
