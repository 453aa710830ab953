"""Decentralized strategies (issue #9) against independent expectations: hand-written mixing matrices,
numpy eigenvalues, conservation laws, a hand-computed quadratic trajectory, and allreduce SGD itself."""

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_bn_net, tiny_config
from lbsgd import optim, strategies, train
from lbsgd.parallel import layout as layout_lib
from lbsgd.parallel import mixing
from lbsgd.parallel.layout import AXIS

N = 4


def make_strategy(name, k, d, topology="", form="awc", seed=0, pool_size=32):
    if name == "allreduce":
        return strategies.Allreduce()
    if name == "dpsgd":
        return strategies.DPSGD(topology=topology or "ring", form=form, num_devices=d, num_workers=k)
    cls = {"gossip_pull": strategies.GossipPull, "gossip_push": strategies.GossipPush}[name]
    return cls(topology=topology or "random", pool_size=pool_size, seed=seed, num_devices=d, num_workers=k)


def batches(steps, k, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(k * N, 8, 8, 1)).astype(np.float32), rng.integers(0, 10, size=(k * N,)).astype(np.int32))
        for _ in range(steps)
    ]


def goyal_tx(k):
    """The real Goyal optimizer: gradual warmup (Remark 2 correction active), Nesterov, weight decay."""
    schedule = optim.goyal_schedule(0.1, k * N, steps_per_epoch=5, warmup="gradual", warmup_epochs=2, decay="none")
    return optim.goyal_sgd(schedule, weight_decay=5e-4), schedule


def train_steps(strategy, k, d, data, tx=None, schedule=None, state_fn=None, on_step=None):
    """Run the real train step; returns the host state. ``state_fn`` may replace the initial state."""
    model = tiny_bn_net()
    if tx is None:
        tx, schedule = goyal_tx(k)
    lay = layout_lib.make_layout(k, d)
    state = train.create_train_state(model, tx, lay, (8, 8, 1), 0, strategy)
    if state_fn is not None:
        state = state_fn(state, lay)
    step = train.make_train_step(model, tx, schedule, lay, per_worker_batch_size=N, strategy=strategy)
    for images, labels in data:
        b = train.global_batch(lay, {"image": images, "label": labels})
        state, _ = step(state, b["image"], b["label"])
        jax.block_until_ready(state)  # CPU collective hazard: never two steps in flight
        if on_step is not None:
            on_step(jax.device_get(state))
    return jax.device_get(state)


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def flat_workers(tree, k):
    return np.concatenate([np.asarray(x).reshape(k, -1) for x in jax.tree.leaves(tree)], axis=1)


# ------------------------------------------------------------------ mixing matrices and collectives


def effective_matrix(pool, k, d, index=0):
    """Mix one-hot inputs through the real collectives: row i of the output is row i of W."""
    lay = layout_lib.make_layout(k, d)
    plans = [mixing.plan(w, d) for w in pool]

    def per_device(x):
        return mixing.mix({"x": x}, plans, AXIS, index=jnp.int32(index))["x"]

    fn = jax.jit(jax.shard_map(per_device, mesh=lay.mesh, in_specs=P(AXIS), out_specs=P(AXIS), check_vma=False))
    x = jax.device_put(np.eye(k, dtype=np.float32), lay.sharding(P(AXIS)))
    return np.asarray(fn(x))


def test_ring_matrix_k5_by_hand():
    t = 1 / 3
    want = np.array(
        [
            [t, t, 0, 0, t],
            [t, t, t, 0, 0],
            [0, t, t, t, 0],
            [0, 0, t, t, t],
            [t, 0, 0, t, t],
        ]
    )
    for d in (5, 1):
        got = effective_matrix(strategies.DPSGD(topology="ring", num_devices=d, num_workers=5).pool, 5, d)
        np.testing.assert_allclose(got, want, atol=1e-7)
        np.testing.assert_allclose(got.sum(0), 1, atol=1e-6)  # the real mixing is doubly stochastic
        np.testing.assert_allclose(got.sum(1), 1, atol=1e-6)


def test_exponential_matrix_k8_by_hand():
    want = np.zeros((8, 8))
    for i in range(8):
        for s in (0, 1, 2, 4):  # itself and peers at distance 2^0, 2^1, 2^2 < 8
            want[i, (i + s) % 8] = 0.25
    for d in (8, 4, 2, 1):
        got = effective_matrix(strategies.DPSGD(topology="exponential", num_devices=d, num_workers=8).pool, 8, d)
        np.testing.assert_allclose(got, want, atol=1e-7)
        np.testing.assert_allclose(got.sum(0), 1, atol=1e-6)
        np.testing.assert_allclose(got.sum(1), 1, atol=1e-6)


@pytest.mark.parametrize("topology", ["ring", "exponential", "complete", "one_peer_exponential"])
def test_every_topology_doubly_stochastic_on_every_layout(topology):
    k = 8
    pool = strategies.DPSGD(topology=topology, num_workers=k).pool
    for index in range(len(pool)):
        ref = effective_matrix(pool, k, 1, index)
        np.testing.assert_allclose(ref.sum(0), 1, atol=1e-6)
        np.testing.assert_allclose(ref.sum(1), 1, atol=1e-6)
        for d in (8, 2):
            np.testing.assert_allclose(effective_matrix(pool, k, d, index), ref, atol=1e-7)


def test_one_peer_exponential_step_t_uses_distance_2_to_t_mod_log2k():
    pool = strategies.DPSGD(topology="one_peer_exponential", num_workers=8).pool
    assert len(pool) == 3
    for t, dist in enumerate((1, 2, 4)):
        want = np.zeros((8, 8))
        for i in range(8):
            want[i, i] = want[i, (i + dist) % 8] = 0.5
        np.testing.assert_allclose(effective_matrix(pool, 8, 4, t), want, atol=1e-7)


def test_bytes_are_degree_times_model_never_an_allgather():
    """Each device sends only the rows its neighbours need: ring on 2 devices × 8 workers sends 2 rows."""
    ring16 = mixing.plan(mixing.ring_matrix(16), 2)
    assert ring16.rows_sent_per_device == 2  # not 8 (all the device's workers)
    assert mixing.plan(mixing.ring_matrix(8), 8).rows_sent_per_device == 2
    assert mixing.plan(mixing.ring_matrix(8), 1).rows_sent_per_device == 0
    assert mixing.plan(mixing.exponential_matrix(8), 8).rows_sent_per_device == 3
    assert mixing.plan(mixing.complete_matrix(8), 4).rows_sent_per_device == 3 * 2
    mb = 1000
    assert strategies.DPSGD(topology="ring", num_workers=8).bytes_sent_per_worker_per_step(8, mb) == 2 * mb
    assert strategies.DPSGD(topology="exponential", num_workers=8).bytes_sent_per_worker_per_step(8, mb) == 3 * mb
    assert strategies.DPSGD(topology="complete", num_workers=8).bytes_sent_per_worker_per_step(8, mb) == 7 * mb
    assert strategies.DPSGD(topology="one_peer_exponential", num_workers=8).bytes_sent_per_worker_per_step(8, mb) == mb
    assert strategies.GossipPull(num_workers=8).bytes_sent_per_worker_per_step(8, mb) == mb
    assert strategies.GossipPush(num_workers=8).bytes_sent_per_worker_per_step(8, mb) == mb + 4
    assert strategies.Allreduce().bytes_sent_per_worker_per_step(8, mb) == 2 * 7 / 8 * mb

    # The compiled step really sends that: ppermute operands of the ring step on 2 devices x 8 workers.
    lay = layout_lib.make_layout(16, 2)
    plans = [ring16]
    jaxpr = jax.make_jaxpr(
        jax.shard_map(
            lambda x: mixing.mix({"x": x}, plans, AXIS), mesh=lay.mesh, in_specs=P(AXIS), out_specs=P(AXIS), check_vma=False
        )
    )(jnp.zeros((16, 100)))
    sends = [e.invars[0].aval.shape for e in jaxpr.jaxpr.eqns[0].params["jaxpr"].eqns if e.primitive.name == "ppermute"]
    assert sends == [(2, 100)]


# ------------------------------------------------------------------ pure averaging through the train step


def set_params_to_worker_index(state, lay):
    """x_i = i for every parameter of worker i."""
    k = lay.num_workers

    def fill(t):
        values = np.broadcast_to(np.arange(k, dtype=np.float32).reshape(k, *[1] * (t.ndim - 1)), t.shape)
        return jax.device_put(np.ascontiguousarray(values), t.sharding)

    return state.replace(params=jax.tree.map(fill, state.params))


def hand_matrix(topology, k):
    """The static topologies written out by hand: ring 1/3 on i-1, i, i+1; exponential 1/(1+log2 k) on i + 2^j."""
    w = np.zeros((k, k))
    shifts = (-1, 0, 1) if topology == "ring" else (0, *[2**j for j in range(int(np.log2(k)))])
    for i in range(k):
        for s in shifts:
            w[i, (i + s) % k] = 1 / len(shifts)
    return w


def numpy_distance(x):
    """Consensus distance of per-worker rows x [k, P]: mean_i ‖x_i − x̄‖² / ‖x̄‖², in float64."""
    x = np.asarray(x, np.float64)
    mean = x.mean(0)
    return np.mean(np.sum((x - mean) ** 2, axis=1)) / np.sum(mean**2)


def test_consensus_distance_against_numpy_on_a_hand_made_tree():
    """mean_i ‖x_i − x̄‖² / ‖x̄‖² over all leaves together (k = 8 workers, leaves of several shapes)."""
    k = 8
    rng = np.random.default_rng(4)
    tree = {"a": rng.normal(1.0, 0.5, size=(k, 3)), "b": {"c": rng.normal(-2.0, 1.0, size=(k, 2, 2))},
            "d": rng.normal(0.5, 0.1, size=(k,))}
    x = np.concatenate([tree["a"], tree["b"]["c"].reshape(k, 4), tree["d"][:, None]], axis=1)
    mean = x.mean(0)
    want = sum(np.sum((x[i] - mean) ** 2) for i in range(k)) / k / np.sum(mean**2)
    got = float(mixing.consensus_distance(jax.tree.map(lambda t: jnp.asarray(t, jnp.float32), tree)))
    assert got == pytest.approx(want, rel=1e-5)
    # Two workers at 0 and 2 (x̄ = 1): each is 1 away, so the distance is exactly 1.
    assert float(mixing.consensus_distance({"x": jnp.array([[0.0], [2.0]])})) == pytest.approx(1.0, rel=1e-6)
    assert float(mixing.consensus_distance({"x": jnp.ones((4, 3))})) == 0.0


@pytest.mark.parametrize("topology,k,d", [("ring", 8, 8), ("ring", 8, 2), ("exponential", 8, 4), ("ring", 5, 5)])
def test_pure_averaging_preserves_mean_and_contracts_at_rate_rho(topology, k, d):
    strategy = strategies.DPSGD(topology=topology, num_devices=d, num_workers=k)
    rho = np.sort(np.abs(np.linalg.eigvals(hand_matrix(topology, k))))[-2]  # numpy, on the hand-written W
    if topology == "ring":  # circulant: eigenvalues (1 + 2 cos(2πj/k)) / 3
        assert rho == pytest.approx(max(abs(1 + 2 * np.cos(2 * np.pi * j / k)) / 3 for j in range(1, k)))
    distances, means = [], []
    consensus = train.make_consensus_fn(strategy)

    def record(state):
        x = flat_workers(state.params, k)
        means.append(x.mean(0))
        distances.append(numpy_distance(x))
        assert float(consensus(state)) == pytest.approx(distances[-1], rel=1e-4)

    zero = optax.set_to_zero()
    train_steps(strategy, k, d, batches(10, k), tx=zero, schedule=optax.constant_schedule(0.0),
                state_fn=set_params_to_worker_index, on_step=record)
    for mean in means:
        np.testing.assert_allclose(mean, (k - 1) / 2, atol=1e-6)
    ratio = np.sqrt(distances[-1] / distances[-2])  # consensus distance is squared: falls like rho^(2t)
    assert ratio == pytest.approx(rho, rel=0.1), (ratio, rho)
    assert distances[-1] < distances[0]


def test_one_peer_exponential_reaches_exact_consensus_in_log2k_steps():
    """Known property of the one-peer exponential graph for k = 2^p: the exact average after p steps."""
    k = 8
    strategy = strategies.DPSGD(topology="one_peer_exponential", num_devices=4, num_workers=k)
    distances, numpy_distances = [], []

    def record(s):
        distances.append(float(jax.device_get(train.make_consensus_fn(strategy)(s))))
        numpy_distances.append(numpy_distance(flat_workers(s.params, k)))

    train_steps(strategy, k, 4, batches(3, k), tx=optax.set_to_zero(), schedule=optax.constant_schedule(0.0),
                state_fn=set_params_to_worker_index, on_step=record)
    # The reported distance against the numpy one of the same recorded per-worker parameters.
    assert distances[1] == pytest.approx(numpy_distances[1], rel=1e-5) and numpy_distances[1] > 1e-3
    assert distances[2] < 1e-12 and numpy_distances[2] < 1e-12


# ------------------------------------------------------------------ equalities with allreduce SGD


@pytest.mark.parametrize("d", [8, 2])
def test_dpsgd_atc_on_complete_equals_allreduce_sgd(d):
    k = 8
    data = batches(20, k, seed=3)
    ref = train_steps(strategies.Allreduce(), k, d, data)
    got = train_steps(make_strategy("dpsgd", k, d, topology="complete", form="atc"), k, d, data)
    for w in range(k):
        worker = jax.tree.map(lambda t: t[w], got.params)
        assert np.abs(flat(worker) - flat(ref.params)).max() <= 1e-5
    np.testing.assert_allclose(flat(got.batch_stats), flat(ref.batch_stats), atol=1e-5)


# ------------------------------------------------------------------ a hand-computed D-PSGD trajectory


def drive(strategy, k, d, init, centres, lr, steps, override=None):
    """Drive the strategy's prepare/update with the gradient of f_i(x) = ½‖x − c_i‖² and plain SGD.

    ``init`` is the initial model (one vector); ``override(params, extra)`` may replace the initial
    state. Returns, for every step, (params, extra) after it and the step metrics logged for it.
    """
    lay = layout_lib.make_layout(k, d)
    tx = optax.sgd(lr)
    params, opt_state, extra = strategy.init({"x": jnp.asarray(init, jnp.float32)}, tx, k)
    if override is not None:
        params, extra = override(params, extra)

    def per_device(params, opt_state, extra, c, step):
        ctx = strategies.StepContext(axis=AXIS, num_workers=k, num_devices=d, workers_per_device=k // d, step=step)
        metrics = strategy.step_metrics(ctx, extra)
        at = strategy.prepare(ctx, params, extra)
        grads = {"x": at["x"] - c}
        return (*strategy.update(ctx, tx, params, opt_state, extra, at, grads), metrics)

    specs = strategy.specs(params, opt_state, extra)
    fn = jax.jit(
        jax.shard_map(
            per_device, mesh=lay.mesh, in_specs=(*specs, P(AXIS), P()), out_specs=(*specs, P()), check_vma=False
        )
    )
    out = []
    for t in range(steps):
        params, opt_state, extra, metrics = fn(params, opt_state, extra, jnp.asarray(centres), jnp.int32(t))
        out.append((jax.device_get(params), jax.device_get(extra), jax.device_get(metrics)))
    return out


def run_strategy_on_quadratic(strategy, x0, centres, lr, steps, d, trajectory=False):
    """``drive`` with per-worker starting points x0 [k, dim]; returns the final (x, extra) or all of them."""
    k = x0.shape[0]
    out = drive(strategy, k, d, np.zeros(x0.shape[1:]), centres, lr, steps,
                override=lambda p, e: ({"x": jnp.asarray(x0)}, e))
    out = [(np.asarray(p["x"]), e) for p, e, _ in out]
    return out if trajectory else out[-1]


@pytest.mark.parametrize("d", [4, 2, 1])
def test_two_dpsgd_steps_on_a_quadratic_by_hand(d):
    x0 = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, -1.0], [-2.0, 1.0]], np.float32)
    c = np.array([[0.5, 0.5], [1.0, -1.0], [0.0, 0.0], [2.0, 3.0]], np.float32)
    lr = 0.1
    # Ring of 4: worker i averages i-1, i, i+1 with 1/3 each. AWC: x_i <- Σ_j W_ij x_j - lr (x_i - c_i).
    x1 = np.zeros_like(x0)
    for i in range(4):
        x1[i] = (x0[(i - 1) % 4] + x0[i] + x0[(i + 1) % 4]) / 3 - lr * (x0[i] - c[i])
    x2 = np.zeros_like(x0)
    for i in range(4):
        x2[i] = (x1[(i - 1) % 4] + x1[i] + x1[(i + 1) % 4]) / 3 - lr * (x1[i] - c[i])
    got, _ = run_strategy_on_quadratic(make_strategy("dpsgd", 4, d), x0, c, lr, 2, d)
    np.testing.assert_allclose(got, x2, rtol=1e-6, atol=1e-6)
    # ATC: x_i <- Σ_j W_ij (x_j - lr (x_j - c_j)).
    y0 = x0 - lr * (x0 - c)
    a1 = np.stack([(y0[(i - 1) % 4] + y0[i] + y0[(i + 1) % 4]) / 3 for i in range(4)])
    got, _ = run_strategy_on_quadratic(make_strategy("dpsgd", 4, d, form="atc"), x0, c, lr, 1, d)
    np.testing.assert_allclose(got, a1, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ gossip


def test_gossip_pull_peers_form_a_derangement_and_are_uniform():
    """One step from x_i = 2^i with lr 0: worker i ends at (x_i + x_j)/2, so j is recoverable exactly."""
    k = 8
    x0 = (2.0 ** np.arange(k)).astype(np.float32)[:, None]
    strategy = make_strategy("gossip_pull", k, 4)
    got, _ = run_strategy_on_quadratic(strategy, x0, x0, 0.0, 1, 4)
    peers = np.log2(2 * got[:, 0] - x0[:, 0]).round().astype(int)
    assert sorted(peers) == list(range(k)) and np.all(peers != np.arange(k))
    # Uniform over the other k-1 workers: worker 0's peer at step 0 over 1400 seeds (pool and draw).
    seeds = np.arange(1400)
    index = np.asarray(jax.jit(jax.vmap(lambda s: strategies.gossip.pool_index(s, 0, 32)))(seeds))
    peer_of_0 = [np.flatnonzero(mixing.pull_pool(k, 32, int(s))[i][0])[1] for s, i in zip(seeds, index)]
    counts = np.bincount(peer_of_0, minlength=k)
    assert counts[0] == 0
    chi2 = np.sum((counts[1:] - 200) ** 2 / 200)
    assert chi2 < 40, counts  # 6 degrees of freedom; p < 1e-6 beyond 40


@pytest.mark.parametrize("d", [8, 2])
def test_push_sum_conserves_mass_and_weights_and_debiased_models_converge(d):
    k = 8
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(k, 3)).astype(np.float32)
    strategy = make_strategy("gossip_push", k, d, pool_size=8)
    trajectory = run_strategy_on_quadratic(strategy, x0, x0, 0.0, 40, d, trajectory=True)
    for x, extra in trajectory:
        np.testing.assert_allclose(x.sum(0), x0.sum(0), rtol=1e-5, atol=1e-5)  # Σ x_i conserved
        assert extra["weight"].sum() == pytest.approx(k, rel=1e-6)  # Σ w_i = k
    assert min(extra["weight"].min() for _, extra in trajectory[:3]) < 0.9  # the weights move (column stochastic)
    x, extra = trajectory[-1]
    z = x / extra["weight"][:, None]
    np.testing.assert_allclose(z, np.broadcast_to(x0.mean(0), z.shape), atol=1e-4)


def test_push_sum_one_peer_exponential_keeps_weights_at_one():
    k = 8
    x0 = np.arange(k, dtype=np.float32)[:, None]
    x, extra = run_strategy_on_quadratic(make_strategy("gossip_push", k, 4, "one_peer_exponential"), x0, x0, 0.0, 3, 4)
    np.testing.assert_allclose(extra["weight"], 1.0)
    np.testing.assert_allclose(x[:, 0], 3.5, atol=1e-6)  # exact average after log2 k steps


@pytest.mark.parametrize("d", [2, 8])
def test_push_sum_gradient_is_taken_at_the_debiased_model_by_hand(d):
    """Push-sum with a nonzero learning rate from weights w_i ≠ 1: x_i ← x_i − η (x_i / w_i − c_i) (the
    gradient of ½‖z − c_i‖² at z_i = x_i / w_i), then (x, w) ← P_t (x, w) with P_t written by hand: worker j
    keeps half and pushes half to j + 2^(t mod 3) (k = 8)."""
    k, lr, steps = 8, 0.1, 3
    rng = np.random.default_rng(3)
    x0 = rng.normal(size=(k, 2)).astype(np.float32)
    c = rng.normal(size=(k, 2)).astype(np.float32)
    w0 = np.array([0.5, 1.5, 1.0, 2.0, 0.25, 1.75, 0.8, 0.2], np.float32)
    strategy = make_strategy("gossip_push", k, d, "one_peer_exponential")
    out = drive(strategy, k, d, np.zeros(2), c, lr, steps, override=lambda p, e: ({"x": x0}, {"weight": w0}))
    x, w = x0.astype(np.float64), w0.astype(np.float64)
    for t in range(steps):
        assert np.abs(w - 1).max() > 0.1  # the gradient's point x/w differs from x (w reaches 1 after 3 steps)
        push = 0.5 * np.eye(k)
        for j in range(k):
            push[(j + 2 ** (t % 3)) % k, j] += 0.5
        x = push @ (x - lr * (x / w[:, None] - c))
        w = push @ w
        params, extra, _ = out[t]
        np.testing.assert_allclose(extra["weight"], w, rtol=1e-6)
        np.testing.assert_allclose(params["x"], x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gossip_pull", "gossip_push", "dpsgd"])
def test_same_run_on_8_2_1_devices(name):
    """One worker per device, four, and all eight on one device (test_train.py: 4 devices, for allreduce)."""
    k = 8
    data = batches(4, k, seed=5)
    topology = "one_peer_exponential" if name == "dpsgd" else ""
    runs = {d: train_steps(make_strategy(name, k, d, topology, pool_size=4), k, d, data) for d in (8, 2, 1)}
    ref = flat((runs[8].params, runs[8].batch_stats, runs[8].extra))
    for d in (2, 1):
        got = flat((runs[d].params, runs[d].batch_stats, runs[d].extra))
        assert np.abs(got - ref).max() <= 1e-5, d
    x = flat_workers(runs[8].params, k)
    assert np.abs(x - x.mean(0)).max() > 1e-6  # the workers really hold different models


def test_gossip_accumulation_microsteps_give_the_same_run():
    """Per-worker parameters also split across accumulation microsteps (whole workers each)."""
    k, d = 8, 1
    data = batches(3, k, seed=6)
    model = tiny_bn_net()
    tx, schedule = goyal_tx(k)
    lay = layout_lib.make_layout(k, d)
    strategy = make_strategy("gossip_pull", k, d, pool_size=4)
    out = []
    for a in (1, 4):
        state = train.create_train_state(model, tx, lay, (8, 8, 1), 0, strategy)
        step = train.make_train_step(model, tx, schedule, lay, per_worker_batch_size=N, strategy=strategy,
                                     accumulation_steps=a)
        for images, labels in data:
            b = train.global_batch(lay, {"image": images, "label": labels})
            state, _ = step(state, b["image"], b["label"])
            jax.block_until_ready(state)
        out.append(flat(jax.device_get((state.params, state.batch_stats))))
    assert np.abs(out[0] - out[1]).max() <= 1e-6


# ------------------------------------------------------------------ config checks


def _config(**fields):
    """The digits config with ``fields`` set (``section.key`` for nested options)."""
    c = tiny_config("")
    for key, value in fields.items():
        *section, leaf = key.split(".")
        (c[section[0]] if section else c)[leaf] = value
    return c


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"strategy": "carrier_pigeon"}, "config.strategy='carrier_pigeon' is unknown"),
        ({"strategy": "dpsgd", "topology": "torus"}, "config.topology='torus' is unknown for strategy 'dpsgd'"),
        ({"strategy": "gossip_pull", "topology": "ring"}, "unknown for strategy 'gossip_pull'"),
        ({"topology": "ring"}, "does not apply to strategy 'allreduce'"),
        ({"strategy": "dpsgd", "num_workers": 2}, "topology 'ring' needs at least 3 workers"),
        ({"strategy": "gossip_push", "num_workers": 1}, "needs at least 2 workers"),
        ({"dpsgd.form": "atc"}, "config.dpsgd.form is an option of strategy dpsgd, not of 'allreduce'"),
        ({"strategy": "dpsgd", "gossip.pool_size": 8}, "config.gossip.pool_size is an option of strategy gossip_pull"),
        ({"strategy": "dpsgd", "aggregation": "ring"}, "applies to strategy 'allreduce' only"),
        ({"strategy": "dpsgd", "dpsgd.form": "cta"}, "config.dpsgd.form='cta' is unknown"),
        ({"strategy": "gossip_pull", "gossip.pool_size": 0}, "config.gossip.pool_size=0 must be a positive integer"),
    ],
)
def test_bad_strategy_settings_are_one_line(fields, message):
    from lbsgd import validate

    with pytest.raises(validate.ConfigError) as e:
        validate.check_config(_config(**fields))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_good_strategy_settings_pass_and_defaults_match_the_modules():
    from lbsgd import validate

    for fields in (
        {"strategy": "dpsgd", "topology": "exponential", "dpsgd.form": "atc"},
        {"strategy": "dpsgd", "num_workers": 3},
        {"strategy": "gossip_push", "topology": "one_peer_exponential", "gossip.pool_size": 4},
        {"strategy": "gossip_pull", "num_workers": 2},
        {"strategy": "allreduce", "aggregation": "ring"},
    ):
        validate.check_config(_config(**fields))
    c = _config()
    assert dict(c.dpsgd) == dataclasses.asdict(strategies.dpsgd.DPSGDOptions())
    assert dict(c.gossip) == dataclasses.asdict(strategies.gossip.GossipOptions())
    assert strategies.from_config(_config(strategy="dpsgd"), 8).describe() == {
        "strategy": "dpsgd", "topology": "ring", "form": "awc"
    }
