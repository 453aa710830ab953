"""Gradient aggregation across workers: allreduce algorithms and bucketing.

Goyal et al. (2017), §4 "Communication": after the backward pass every one of
the k workers holds its own gradient; the workers must *sum* them (an
allreduce) before the update. The paper (i) packs the many per-layer gradient
arrays into a few large buffers ("bucketing") so that one collective is issued
per bucket rather than per parameter array, and (ii) uses recursive
halving/doubling for the inter-server allreduce, noting it needs log2(p)
rather than p-1 latency-bound steps compared to the bucket ring algorithm.

This module offers three interchangeable ways to sum over a named mesh axis,
selected with ``config.aggregation``:

* ``"psum"``             -- ``lax.psum``; XLA's native all-reduce (default).
* ``"ring"``             -- ring reduce-scatter + ring all-gather,
                            2(p-1) ``ppermute`` steps.
* ``"halving_doubling"`` -- recursive-halving reduce-scatter + recursive-
                            doubling all-gather, 2*log2(p) ``ppermute`` steps
                            (plus 2 for non-power-of-two p).

All functions are meant to be called *inside* ``jax.shard_map`` (the axis name
must be bound). The axis size p must be static, because ``ppermute``
permutations are Python lists; it is read with ``lax.axis_size`` unless passed
explicitly as ``axis_size=``.

Note on JAX's replication checking (``shard_map(check_vma=True)``, the
default): ``lax.psum`` returns a value JAX *knows* is identical on every
worker, so it may leave through ``out_specs=P()``. The ``ppermute``-built
algorithms return the same numbers on every worker, but JAX types the result
as varying over the axis; return it with an axis in ``out_specs`` or use
``check_vma=False``.

This package knows workers, meshes and pytrees, never a model or dataset.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

AGGREGATIONS = ("psum", "ring", "halving_doubling")

MIB = 1 << 20


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _static_axis_size(axis_name, axis_size: int | None) -> int:
    """The static number of workers p along ``axis_name``."""
    if axis_size is None:
        axis_size = lax.axis_size(axis_name)  # a Python int inside shard_map
    try:
        p = int(axis_size)
    except TypeError as e:  # a tracer: size unknown at trace time
        raise ValueError(
            f"the size of mesh axis {axis_name!r} must be static; pass axis_size=<number of workers>"
        ) from e
    if p < 1:
        raise ValueError(f"axis size must be >= 1, got {p}")
    return p


def _check_flat(x):
    if x.ndim != 1:
        raise ValueError(f"expected a flat 1-D buffer, got shape {x.shape}")


def _pad_to_multiple(x, k: int):
    """Zero-pad the 1-D ``x`` so its length is a multiple of ``k``."""
    n = x.shape[0]
    m = -(-n // k) * k
    if m == n:
        return x
    return jnp.concatenate([x, jnp.zeros((m - n,), x.dtype)])


def _shift_perm(p: int, shift: int = 1):
    """Ring permutation: rank i sends to rank (i + shift) mod p."""
    return [(i, (i + shift) % p) for i in range(p)]


def _xor_perm(q: int, d: int):
    """Pairwise exchange among ranks 0..q-1: rank i <-> rank i XOR d."""
    return [(i, i ^ d) for i in range(q)]


# --------------------------------------------------------------------------
# flat-buffer algorithms
# --------------------------------------------------------------------------


def psum_allreduce(x, axis_name, *, axis_size: int | None = None):
    """Sum the flat buffer ``x`` over ``axis_name`` with XLA's ``lax.psum``.

    The baseline of Goyal et al. §4 comparisons: one native all-reduce; the
    algorithm is chosen by XLA / the backend (e.g. NCCL on GPU).
    ``axis_size`` is accepted for signature parity and ignored.
    """
    del axis_size
    return lax.psum(x, axis_name)


def ring_allreduce(x, axis_name, *, axis_size: int | None = None):
    """Ring allreduce (sum) of the flat buffer ``x`` over ``axis_name``.

    The bandwidth-optimal "bucket"/ring algorithm discussed in Goyal et al.
    §4. The buffer is zero-padded to a multiple of p and viewed as p chunks.

    * Reduce-scatter, p-1 steps: at step s, rank r sends its partial chunk
      (r - s) mod p to rank r+1 and adds the chunk (r - 1 - s) mod p it
      receives from rank r-1 into its own. Afterwards rank r holds the full
      sum of chunk (r + 1) mod p.
    * All-gather, p-1 steps: at step s, rank r forwards its finished chunk
      (r + 1 - s) mod p to rank r+1 and stores chunk (r - s) mod p from r-1.

    2(p-1) ``lax.ppermute`` steps, each moving b/p bytes per node: every node
    sends 2(p-1)/p * b bytes and reduces (p-1)/p * b bytes, which
    ``lbsgd.commcost.ring_cost`` models. Works for any p, including buffers
    with fewer than p elements (the chunks are then mostly padding).
    The steps are unrolled, so the jaxpr holds exactly 2(p-1) ppermutes.
    """
    _check_flat(x)
    p = _static_axis_size(axis_name, axis_size)
    n = x.shape[0]
    if p == 1 or n == 0:
        return x
    buf = _pad_to_multiple(x, p)
    c = buf.shape[0] // p  # chunk length
    rank = lax.axis_index(axis_name)
    to_next = _shift_perm(p, +1)

    def chunk_at(i):
        return (i % p) * c

    # Reduce-scatter. The partial sum received at step s is the one sent on
    # at step s+1, so it is carried in `acc` instead of written back.
    acc = lax.dynamic_slice_in_dim(buf, chunk_at(rank), c)
    for s in range(p - 1):
        recv = lax.ppermute(acc, axis_name, to_next)
        acc = lax.dynamic_slice_in_dim(buf, chunk_at(rank - 1 - s), c) + recv
    # acc is now the full sum of chunk (rank + 1) mod p.
    # All-gather: forward what was received last step; store each chunk.
    buf = lax.dynamic_update_slice_in_dim(buf, acc, chunk_at(rank + 1), 0)
    for s in range(p - 1):
        acc = lax.ppermute(acc, axis_name, to_next)
        buf = lax.dynamic_update_slice_in_dim(buf, acc, chunk_at(rank - s), 0)
    return buf[:n]


def halving_doubling_allreduce(x, axis_name, *, axis_size: int | None = None):
    """Recursive halving/doubling allreduce (sum) of flat ``x`` over an axis.

    The inter-server algorithm of Goyal et al. §4 (Thakur et al. 2005;
    Rabenseifner). For q = p a power of two, the buffer is zero-padded to a
    multiple of q and:

    * Reduce-scatter by recursive halving, log2(q) steps: with distance
      d = q/2, q/4, ..., 1, rank r exchanges with partner r XOR d; the rank
      whose bit d is 0 keeps the lower half of its current segment and sends
      the upper half (the partner does the opposite), then adds the received
      half into the kept half. Afterwards rank r holds the full sum of block r
      (size b/q).
    * All-gather by recursive doubling, log2(q) steps: with d = 1, 2, ...,
      q/2, rank r sends its finished segment (d blocks) to r XOR d and stores
      the partner's segment next to it.

    2*log2(q) ``lax.ppermute`` steps; bytes sent per node
    b/2 + b/4 + ... = 2(q-1)/q * b, reduced (q-1)/q * b -- the same volume as
    the ring, with log2 rather than linear latency.

    Non-power-of-two p (the standard pre/post step, Thakur et al. §4.4 style):
    let q be the largest power of two <= p and r = p - q. *Pre-step*: rank
    q+j (j < r) sends its whole buffer to rank j, which adds it (1 step,
    b bytes, b reduced). Ranks 0..q-1 then run halving/doubling as above
    while the r extra ranks idle. *Post-step*: rank j sends the result back to
    rank q+j (1 step, b bytes). Cost: 2*log2(q) + 2 steps, 2(q-1)/q*b + 2b
    bytes on the critical path, (q-1)/q*b + b reduced; see
    ``lbsgd.commcost.halving_doubling_cost``.
    """
    _check_flat(x)
    p = _static_axis_size(axis_name, axis_size)
    n = x.shape[0]
    if p == 1 or n == 0:
        return x
    q = 1 << (p.bit_length() - 1)  # largest power of two <= p
    extra = p - q
    rank = lax.axis_index(axis_name)

    if extra:  # pre-step: fold the extra ranks into ranks 0..extra-1
        x = x + lax.ppermute(x, axis_name, [(q + j, j) for j in range(extra)])

    buf = _pad_to_multiple(x, q)
    m = buf.shape[0]
    c = m // q  # final block size per rank

    # Recursive halving: segment [lo, lo + seg) shrinks by half each step.
    # Ranks >= q compute garbage here (they receive zeros); it is discarded.
    lo = jnp.zeros((), jnp.int32)
    seg = m
    d = q // 2
    while d >= 1:
        half = seg // 2
        upper = (rank & d) != 0
        keep_off = lo + jnp.where(upper, half, 0)
        send_off = lo + jnp.where(upper, 0, half)
        recv = lax.ppermute(lax.dynamic_slice_in_dim(buf, send_off, half), axis_name, _xor_perm(q, d))
        kept = lax.dynamic_slice_in_dim(buf, keep_off, half) + recv
        buf = lax.dynamic_update_slice_in_dim(buf, kept, keep_off, axis=0)
        lo, seg, d = keep_off, half, d // 2

    # Recursive doubling: rank r's finished blocks grow 1, 2, 4, ... blocks.
    d = 1
    while d < q:
        own_off = (rank // d) * d * c
        partner_off = ((rank ^ d) // d) * d * c
        recv = lax.ppermute(lax.dynamic_slice_in_dim(buf, own_off, d * c), axis_name, _xor_perm(q, d))
        buf = lax.dynamic_update_slice_in_dim(buf, recv, partner_off, axis=0)
        d *= 2

    out = buf[:n]
    if extra:  # post-step: hand the result back to the extra ranks
        back = lax.ppermute(out, axis_name, [(j, q + j) for j in range(extra)])
        out = jnp.where(rank >= q, back, out)
    return out


FLAT_ALGORITHMS: dict[str, Callable[..., Any]] = {
    "psum": psum_allreduce,
    "ring": ring_allreduce,
    "halving_doubling": halving_doubling_allreduce,
}


def _check_method(method: str) -> Callable[..., Any]:
    if method not in FLAT_ALGORITHMS:
        raise ValueError(f"unknown config.aggregation={method!r}; valid values: {', '.join(AGGREGATIONS)}")
    return FLAT_ALGORITHMS[method]


# --------------------------------------------------------------------------
# bucketing (Goyal et al. §4: pack gradients, one collective per bucket)
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One contiguous 1-D buffer of same-dtype leaves.

    ``leaves`` lists the flat-leaf indices (``jax.tree.leaves`` order) packed
    into this bucket, in order; ``sizes`` their element counts.
    """

    dtype: np.dtype
    leaves: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def size(self) -> int:
        """Elements in the bucket."""
        return sum(self.sizes)

    @property
    def nbytes(self) -> int:
        """Bytes in the bucket."""
        return self.size * np.dtype(self.dtype).itemsize


def plan_buckets(tree, bucket_mb: float | None = 25.0) -> list[Bucket]:
    """Group the pytree's leaves into buckets of at most ``bucket_mb`` MiB.

    Goyal et al. §4: gradients of many small layers are packed into a few
    large buffers so that the per-message latency is paid per bucket, not per
    parameter array. Leaves are grouped by dtype (a bucket is one dtype) and,
    within a dtype, packed greedily in leaf order; a bucket is closed when the
    next leaf would overflow it. A leaf larger than ``bucket_mb`` gets a
    bucket of its own (it is not split). ``bucket_mb=None`` means no limit:
    one bucket per dtype. Empty (size-0) leaves are left out of every bucket.
    Works on arrays or on ``jax.ShapeDtypeStruct`` leaves.
    """
    if bucket_mb is not None and not bucket_mb > 0:
        raise ValueError(f"bucket_mb must be > 0 or None, got {bucket_mb}")
    limit = None if bucket_mb is None else bucket_mb * MIB
    # dtype -> [(leaf index, size)] of the bucket being filled
    open_: dict[np.dtype, list[tuple[int, int]]] = {}
    done: list[Bucket] = []

    def close(dt):
        members = open_.pop(dt, [])
        if members:
            done.append(Bucket(dt, tuple(i for i, _ in members), tuple(s for _, s in members)))

    for i, leaf in enumerate(jax.tree.leaves(tree)):
        dt = np.dtype(leaf.dtype)
        size = int(np.prod(leaf.shape, dtype=np.int64))
        if size == 0:
            continue
        members = open_.setdefault(dt, [])
        used = sum(s for _, s in members) * dt.itemsize
        if limit is not None and members and used + size * dt.itemsize > limit:
            close(dt)
            members = open_.setdefault(dt, [])
        members.append((i, size))
    for dt in list(open_):
        close(dt)
    done.sort(key=lambda b: b.leaves[0])  # deterministic, leaf order
    return done


def flatten_buckets(leaves: Sequence[Any], buckets: Sequence[Bucket]):
    """Concatenate the leaves of each bucket into one flat 1-D buffer."""
    return [
        jnp.concatenate([jnp.ravel(leaves[i]) for i in b.leaves])
        if len(b.leaves) > 1
        else jnp.ravel(leaves[b.leaves[0]])
        for b in buckets
    ]


def unflatten_buckets(buffers: Sequence[Any], buckets: Sequence[Bucket], leaves: Sequence[Any]) -> list[Any]:
    """Inverse of ``flatten_buckets``: split buffers back into leaf shapes.

    ``leaves`` supplies the original shapes and dtypes (and the values of
    leaves that were in no bucket, i.e. empty ones).
    """
    out = list(leaves)
    for buf, b in zip(buffers, buckets):
        off = 0
        for i, size in zip(b.leaves, b.sizes):
            out[i] = buf[off : off + size].reshape(jnp.shape(leaves[i]))
            off += size
    return out


def allreduce_sum(
    tree, axis_name, *, method: str = "psum", bucket_mb: float | None = 25.0, axis_size: int | None = None
):
    """Sum a pytree over the named mesh axis (call inside ``jax.shard_map``).

    Goyal et al. §4: the leaves are packed into same-dtype buckets of at most
    ``bucket_mb`` MiB (see ``plan_buckets``) and one allreduce is issued per
    bucket with the algorithm ``method`` (``config.aggregation``): ``"psum"``
    (XLA native), ``"ring"`` (``ring_allreduce``) or ``"halving_doubling"``
    (``halving_doubling_allreduce``). The result has the input's structure,
    shapes and dtypes; integer sums are exact (wrapping like ``lax.psum``).

    ``axis_size`` is the static number of workers; by default it is read with
    ``lax.axis_size(axis_name)``.

    With ``shard_map(check_vma=True)`` only ``"psum"`` results may leave
    through a replicated ``out_specs=P()``; see the module docstring.
    """
    algo = _check_method(method)
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    buckets = plan_buckets(leaves, bucket_mb)
    buffers = flatten_buckets(leaves, buckets)
    summed = [algo(buf, axis_name, axis_size=axis_size) for buf in buffers]
    return jax.tree.unflatten(treedef, unflatten_buckets(summed, buckets, leaves))
