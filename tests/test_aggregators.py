"""Allreduce algorithms and bucketing (Goyal et al. 2017, §4).

Runs on CPU with 8 simulated devices (see conftest.py). Every expectation is
independent of the code under test: ``lax.psum`` and a float64 numpy sum on
the host, closed-form step counts, hand-counted buckets.
"""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lbsgd import commcost
from lbsgd.parallel import aggregators as agg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MB = 16 / agg.MIB  # 16-byte buckets: (almost) one bucket per leaf


def _mesh(p):
    assert len(jax.devices()) >= 8, "conftest.py must force 8 host devices"
    return Mesh(np.array(jax.devices()[:p]), ("w",))


def _leaf_shapes():
    """Mixed shapes and dtypes: odd sizes, a scalar, < p elements, empty."""
    return {
        "conv": ((5, 3), np.float32),
        "odd": ((7,), np.float32),
        "scalar": ((), np.float32),
        "one": ((1,), np.float32),
        "empty": ((0,), np.float32),
        "half": ((2, 3), jnp.bfloat16),
        "count": ((11,), np.int32),
        "bias": ((3,), np.float32),
    }


def _worker_data(p, seed):
    """Different values on every worker: arrays with a leading axis of p."""
    rng = np.random.RandomState(seed)
    out = {}
    for name, (shape, dt) in _leaf_shapes().items():
        full = (p,) + shape
        if dt == np.int32:
            out[name] = rng.randint(-(10**6), 10**6, size=full).astype(np.int32)
        elif dt == jnp.bfloat16:
            # small integers: every partial sum is exact in bfloat16, so all
            # summation orders must agree bit for bit
            out[name] = rng.randint(-8, 9, size=full).astype(jnp.bfloat16)
        else:
            out[name] = rng.standard_normal(full).astype(np.float32)
    return out


@pytest.mark.parametrize("p", range(1, 9))
def test_every_method_equals_psum_and_host_sum(p):
    mesh = _mesh(p)
    host = _worker_data(p, seed=p)
    x = jax.device_put(host, NamedSharding(mesh, P("w")))
    settings = [(m, b) for m in agg.AGGREGATIONS for b in (None, TINY_MB)]

    def body(tree):
        mine = jax.tree.map(lambda v: v[0], tree)
        outs = {"ref": jax.lax.psum(mine, "w")}
        for m, b in settings:
            outs[f"{m}/{b}"] = agg.allreduce_sum(mine, "w", method=m, bucket_mb=b)
        return jax.tree.map(lambda v: v[None], outs)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("w"), out_specs=P("w")))
    outs = jax.device_get(jax.block_until_ready(f(x)))

    for key, got_tree in outs.items():
        for name, got in got_tree.items():
            data = host[name]
            ref = outs["ref"][name]
            assert got.shape == data.shape, (key, name)
            assert got.dtype == data.dtype, (key, name)
            # every worker holds the same result
            np.testing.assert_array_equal(got, np.broadcast_to(got[:1], got.shape))
            res = np.asarray(got[0], np.float64)
            exp64 = np.asarray(data, np.float64).sum(0)
            if data.dtype in (np.int32, jnp.bfloat16):  # exact sums
                np.testing.assert_array_equal(got[0], ref[0], err_msg=key)
                np.testing.assert_array_equal(res, exp64, err_msg=key)
            else:
                scale = np.abs(np.asarray(data, np.float64)).sum(0) + 1e-30
                for exp in (np.asarray(ref[0], np.float64), exp64):
                    rel = np.abs(res - exp) / scale
                    assert rel.size == 0 or rel.max() <= 1e-6, (key, name, p)


@pytest.mark.parametrize("method", ["ring", "halving_doubling"])
@pytest.mark.parametrize("p,n", [(3, 1), (5, 2), (6, 13), (7, 4), (8, 3), (8, 1001)])
def test_flat_buffers_any_length(method, p, n):
    """Flat API: odd lengths and buffers with fewer than p elements."""
    mesh = _mesh(p)
    host = np.random.RandomState(n).randint(-99, 99, (p, n)).astype(np.int32)
    fn = {"ring": agg.ring_allreduce, "halving_doubling": agg.halving_doubling_allreduce}[method]
    f = jax.jit(jax.shard_map(lambda v: fn(v[0], "w", axis_size=p)[None], mesh=mesh, in_specs=P("w"), out_specs=P("w")))
    got = np.asarray(jax.block_until_ready(f(jnp.asarray(host))))
    np.testing.assert_array_equal(got, np.broadcast_to(host.sum(0), (p, n)))


# -- the implementation matches the cost model --------------------------------


def _count(jaxpr, prim):
    """Number of equations of primitive ``prim``, recursing into sub-jaxprs.

    ``lax.psum`` of a varying value traces to ``psum_invariant`` in jax 0.10,
    so "psum" counts both names.
    """
    names = {prim, "psum_invariant"} if prim == "psum" else {prim}
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name in names
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _count(inner, prim)
    return total


def _jaxpr(p, method, tree, bucket_mb=None):
    f = jax.shard_map(
        lambda t: agg.allreduce_sum(t, "w", method=method, bucket_mb=bucket_mb),
        mesh=_mesh(p),
        in_specs=P("w"),
        out_specs=P("w"),
    )
    return jax.make_jaxpr(f)(tree).jaxpr


@pytest.mark.parametrize("p", [2, 3, 4, 5, 6, 7, 8])
def test_ppermute_steps_match_cost_model(p):
    x = jnp.zeros((p * 10,), jnp.float32)
    ring = _count(_jaxpr(p, "ring", x), "ppermute")
    hd = _count(_jaxpr(p, "halving_doubling", x), "ppermute")
    assert ring == 2 * (p - 1)
    if p & (p - 1) == 0:
        assert hd == 2 * int(math.log2(p))
    else:  # pre-step + halving/doubling on q = 2**floor(log2 p) + post-step
        assert hd == 2 * int(math.log2(p)) + 2
    assert ring == commcost.ring_cost(p, 1.0, 0, 0, 0)["steps"]
    assert hd == commcost.halving_doubling_cost(p, 1.0, 0, 0, 0)["steps"]
    assert _count(_jaxpr(p, "psum", x), "ppermute") == 0


def test_one_collective_per_bucket_not_per_leaf():
    p = 4
    # 12 float32 leaves of 1 KiB each + 1 int32 leaf; 4 KiB buckets -> 3 + 1
    tree = {f"w{i:02d}": jnp.zeros((p * 256,), jnp.float32) for i in range(12)}
    tree["step"] = jnp.zeros((p * 4,), jnp.int32)
    local = jax.tree.map(lambda v: jax.ShapeDtypeStruct((v.shape[0] // p,), v.dtype), tree)
    bucket_mb = 4096 / agg.MIB
    assert len(agg.plan_buckets(local, bucket_mb)) == 4
    assert _count(_jaxpr(p, "psum", tree, bucket_mb), "psum") == 4
    assert _count(_jaxpr(p, "ring", tree, bucket_mb), "ppermute") == 4 * 6
    assert _count(_jaxpr(p, "halving_doubling", tree, bucket_mb), "ppermute") == 4 * 4


# -- bucketing ----------------------------------------------------------------


def _sds(n, dt):
    return jax.ShapeDtypeStruct((n,), dt)


def test_plan_buckets_hand_count():
    kib = 1024 // 4  # float32 elements per KiB
    tree = {  # leaves in key order: a b c d e f
        "a": _sds(1024 * kib, jnp.float32),  # 1 MiB
        "b": _sds(512 * kib, jnp.float32),  # 0.5 MiB
        "c": _sds(3 * 1024 * kib, jnp.float32),  # 3 MiB, above the limit
        "d": _sds(1024, jnp.bfloat16),  # 2 KiB
        "e": _sds(10, jnp.int32),
        "f": _sds(kib, jnp.float32),  # 1 KiB
    }
    # 1.5 MiB: [a b] [c] [d] [e] [f]  (c is alone; f cannot join c)
    b15 = agg.plan_buckets(tree, 1.5)
    assert [b.leaves for b in b15] == [(0, 1), (2,), (3,), (4,), (5,)]
    assert [np.dtype(b.dtype) for b in b15] == [np.float32, np.float32, np.dtype(jnp.bfloat16), np.int32, np.float32]
    assert b15[0].nbytes == int(1.5 * agg.MIB)
    # 0.5 MiB: every float32 leaf alone: [a] [b] [c] [d] [e] [f]
    assert len(agg.plan_buckets(tree, 0.5)) == 6
    # 25 MiB (the default): one bucket per dtype
    assert len(agg.plan_buckets(tree)) == 3
    assert len(agg.plan_buckets(tree, None)) == 3
    with pytest.raises(ValueError):
        agg.plan_buckets(tree, 0)


def test_flatten_unflatten_round_trip():
    rng = np.random.RandomState(0)
    tree = {
        "w": rng.standard_normal((4, 5)).astype(np.float32),
        "b": rng.standard_normal((5,)).astype(np.float32),
        "h": jnp.asarray(rng.standard_normal((3, 2)), jnp.bfloat16),
        "n": np.arange(7, dtype=np.int32),
        "s": np.float32(2.5),
        "z": np.zeros((0, 3), np.float32),
    }
    leaves, treedef = jax.tree.flatten(tree)
    for bucket_mb in (None, TINY_MB, 40 / agg.MIB):
        buckets = agg.plan_buckets(leaves, bucket_mb)
        flat = agg.flatten_buckets(leaves, buckets)
        assert all(f.ndim == 1 for f in flat)
        assert sum(f.size for f in flat) == sum(np.size(l) for l in leaves)
        back = jax.tree.unflatten(treedef, agg.unflatten_buckets(flat, buckets, leaves))
        for k in tree:
            assert np.shape(back[k]) == np.shape(tree[k])
            assert back[k].dtype == np.asarray(tree[k]).dtype
            np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(tree[k]))


def test_unknown_method_names_config_key():
    with pytest.raises(ValueError, match=r"config\.aggregation.*psum.*ring"):
        agg.allreduce_sum({"a": jnp.ones(3)}, "w", method="tree")


# -- bench CLI (smoke) -------------------------------------------------------


def _run(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-m", "lbsgd.bench", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_bench_unknown_subcommand_one_line():
    r = _run("nope")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "allreduce" in r.stderr


def test_bench_allreduce_smoke(tmp_path):
    out = tmp_path / "r.json"
    r = _run("allreduce", "--sizes", "1KB", "--devices", "3", "--repeats", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "device kind" in r.stdout and out.exists()
