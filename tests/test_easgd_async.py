"""EASGD and the asynchronous parameter server (issue #10) against hand computations and allreduce SGD."""

import jax
import numpy as np
import pytest

from lbsgd import strategies
from test_strategies import batches, drive, flat, goyal_tx, train_steps

# ------------------------------------------------------------------ EASGD


def easgd(k, beta=0.8, period=1):
    return strategies.EASGD(beta=beta, period=period, num_workers=k)


def test_easgd_beta_zero_is_k_independent_sgd_runs_and_keeps_the_centre():
    """β = 0: the centre never moves and worker w is exactly an SGD run on worker w's examples alone."""
    k, d = 4, 2
    data = batches(3, k, seed=7)
    tx, schedule = goyal_tx(k)  # the schedule of the global kn, as EASGD uses
    got = train_steps(easgd(k, beta=0.0), k, d, data, tx=tx, schedule=schedule)
    start = train_steps(easgd(k, beta=0.0), k, d, [], tx=tx, schedule=schedule)
    np.testing.assert_array_equal(flat(got.extra["center"]), flat(start.extra["center"]))
    n = data[0][0].shape[0] // k
    for w in range(k):
        alone = [(x[w * n : (w + 1) * n], y[w * n : (w + 1) * n]) for x, y in data]
        ref = train_steps(strategies.Allreduce(), 1, 1, alone, tx=tx, schedule=schedule)
        worker = jax.tree.map(lambda t: t[w], got.params)
        assert np.abs(flat(worker) - flat(ref.params)).max() <= 1e-6, w


def test_easgd_elastic_terms_cancel_in_centre_plus_workers():
    """x̃ + Σ x_i changes each step by exactly Σ u_i = −η Σ (x_i − c_i) (gradient at the pre-exchange x_i)."""
    k, d, lr = 4, 2, 0.1
    rng = np.random.default_rng(1)
    x0 = rng.normal(size=(k, 3)).astype(np.float32)
    c = rng.normal(size=(k, 3)).astype(np.float32)
    out = drive(easgd(k, beta=0.9, period=2), k, d, np.zeros(3), c, lr, 6,
                override=lambda p, e: ({"x": x0}, {"center": {"x": np.ones(3, np.float32)}}))
    x_prev, center_prev = x0, np.ones(3)
    for params, extra, _ in out:
        x, center = np.asarray(params["x"]), np.asarray(extra["center"]["x"])
        want = center_prev + x_prev.sum(0) - lr * (x_prev - c).sum(0)
        np.testing.assert_allclose(center + x.sum(0), want, rtol=1e-5, atol=1e-5)
        x_prev, center_prev = x, center


@pytest.mark.parametrize("period", [1, 3])
def test_easgd_trajectory_on_a_quadratic_by_hand(period):
    k, lr, beta = 2, 0.1, 0.8
    alpha = beta / k
    x = np.array([[1.0, -1.0], [3.0, 2.0]])
    c = np.array([[0.0, 1.0], [2.0, -2.0]])
    center = np.array([0.5, 0.5])
    out = drive(easgd(k, beta, period), k, 2, np.zeros(2), c.astype(np.float32), lr, 6,
                override=lambda p, e: ({"x": x.astype(np.float32)}, {"center": {"x": center.astype(np.float32)}}))
    for t in range(6):
        g = x - c
        if (t + 1) % period == 0:  # exchange after local steps period-1, 2*period-1, ...
            new_center = center + alpha * (x - center).sum(0)
            x = x - alpha * (x - center) - lr * g
            center = new_center
        else:
            x = x - lr * g
        params, extra, _ = out[t]
        np.testing.assert_allclose(params["x"], x, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(extra["center"]["x"], center, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ asynchronous parameter server


def async_ps(k, staleness=0, delay="fixed", seed=0):
    return strategies.AsyncPS(staleness=staleness, delay=delay, seed=seed, num_workers=k)


def pull_schedule(k, tau, delay, seed, steps):
    """The documented pull schedule, event by event: ``ages[t, i]`` = the staleness of worker i's gradient
    at step t (steps since the server state it holds), ``next_pull[t, i]`` = the step after which it pulls
    next, as known after step t. Every worker holds the initial model at step 0 (pulled "after step −1").
    'fixed': worker i pulls after step t when (t + 1 + i) mod (τ + 1) = 0. 'random': a pull after step
    t − 1 (t = 0: the start) draws worker i's next interval uniformly from 1 … τ + 1 with the key
    fold_in(fold_in(PRNGKey(seed), t), i) — drawn here with jax.random, not by the strategy."""

    def interval(t, i):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), t), i)
        return int(jax.random.randint(key, (), 1, tau + 2))

    ages, next_pull = np.zeros((steps, k), int), np.zeros((steps, k), int)
    for i in range(k):
        last = -1
        if delay == "random":
            nxt = interval(0, i) - 1
        else:  # the first t >= 0 with (t + 1 + i) mod (τ + 1) = 0
            nxt = (-1 - i) % (tau + 1)
        for t in range(steps):
            ages[t, i] = t - 1 - last
            if t == nxt:
                last = t
                nxt = t + (interval(t + 1, i) if delay == "random" else tau + 1)
            next_pull[t, i] = nxt
    return ages, next_pull


@pytest.mark.parametrize("d", [8, 2])
def test_async_ps_staleness_zero_equals_allreduce(d):
    k = 8
    data = batches(20, k, seed=8)
    ref = train_steps(strategies.Allreduce(), k, d, data)
    got = train_steps(async_ps(k), k, d, data)
    assert np.abs(flat(got.params) - flat(ref.params)).max() <= 1e-5
    np.testing.assert_allclose(flat(got.batch_stats), flat(ref.batch_stats), atol=1e-5)


def test_async_ps_one_worker_is_plain_sgd():
    c = np.array([[2.0, -1.0]], np.float32)
    out = drive(async_ps(1), 1, 1, np.array([0.5, 0.5]), c, 0.2, 5)
    x = np.array([0.5, 0.5])
    for params, _, metrics in out:
        x = x - 0.2 * (x - c[0])
        np.testing.assert_allclose(params["x"], x, rtol=1e-6)
        assert metrics["staleness_max"] == 0


@pytest.mark.parametrize("delay", ["fixed", "random"])
def test_async_ps_applies_the_gradient_at_the_parameters_of_step_t_minus_s(delay):
    """Least squares: x_{t+1} = x_t − η Σ_i ∇f_i(x_{t − s_i}) with s_i the staleness logged for worker i."""
    k, d, lr, tau = 4, 2, 0.05, 3
    rng = np.random.default_rng(2)
    c = rng.normal(size=(k, 3)).astype(np.float32)
    init = rng.normal(size=3)
    steps = 12
    out = drive(async_ps(k, tau, delay, seed=5), k, d, init, c, lr, steps)
    ages, _ = pull_schedule(k, tau, delay, 5, steps)  # the staleness of every gradient, computed here
    history = [init]
    for t, (params, extra, metrics) in enumerate(out):
        grad = sum(history[t - ages[t, i]] - c[i] for i in range(k))
        history.append(history[t] - lr * grad)
        np.testing.assert_allclose(params["x"], history[-1], rtol=1e-5, atol=1e-5)
        assert metrics["staleness_max"] == ages[t].max(), t
        assert metrics["staleness_mean"] == pytest.approx(ages[t].mean(), rel=1e-6), t
        if t + 1 < steps:
            np.testing.assert_array_equal(extra["age"], ages[t + 1])
    assert ages.max() == tau if delay == "fixed" else 1 <= ages.max() <= tau
    assert len({tuple(a) for a in ages.T}) > 1  # the workers' schedules differ (staggered or drawn per worker)


def test_async_ps_random_pulls_are_per_worker_bounded_and_seeded():
    """delay='random': each worker's pull intervals (read off the ages the strategy records) lie in
    1 … τ + 1, the workers do not pull in lockstep, the countdowns match the documented draws, and the
    schedule is a function of the seed: the same seed gives the same run, another seed another one."""
    k, d, tau, steps = 8, 2, 3, 16
    c = np.zeros((k, 1), np.float32)

    def recorded(seed):
        out = drive(async_ps(k, tau, "random", seed=seed), k, d, np.ones(1), c, 0.0, steps)
        ages = np.stack([np.asarray(e["age"]) for _, e, _ in out])  # ages after each step
        countdown = np.stack([np.asarray(e["countdown"]) for _, e, _ in out])
        return ages, countdown

    ages, countdown = recorded(7)
    for i in range(k):
        pulls = [-1, *np.flatnonzero(ages[:, i] == 0)]  # pulled after these steps (-1: the initial copy)
        assert len(pulls) >= 4, (i, pulls)
        assert np.all((np.diff(pulls) >= 1) & (np.diff(pulls) <= tau + 1)), (i, pulls)
        assert steps - 1 - pulls[-1] <= tau  # no interval longer than τ + 1 at the end either
    assert len({tuple(a) for a in ages.T}) > 1, ages  # not in lockstep
    want_ages, next_pull = pull_schedule(k, tau, "random", 7, steps)
    np.testing.assert_array_equal(ages[:-1], want_ages[1:])
    np.testing.assert_array_equal(countdown, next_pull - np.arange(steps)[:, None])
    again, again_countdown = recorded(7)
    np.testing.assert_array_equal(again, ages)
    np.testing.assert_array_equal(again_countdown, countdown)
    other, _ = recorded(8)
    assert not np.array_equal(other, ages)


@pytest.mark.parametrize("name", ["easgd", "async_ps"])
def test_same_run_on_8_2_1_devices(name):
    k = 8
    data = batches(4, k, seed=9)
    make = (lambda: easgd(k, period=2)) if name == "easgd" else (lambda: async_ps(k, 2, "random"))
    runs = {d: train_steps(make(), k, d, data) for d in (8, 2, 1)}
    ref = flat((runs[8].params, runs[8].batch_stats, runs[8].extra))
    for d in (2, 1):
        assert np.abs(flat((runs[d].params, runs[d].batch_stats, runs[d].extra)) - ref).max() <= 1e-5, d
