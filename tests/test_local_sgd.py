"""Local SGD, post-local, hierarchical, SlowMo and DiLoCo against independent expectations: allreduce SGD,
k single-worker runs, hand-written block matrices, a numpy hand computation, and a killed run resumed."""

import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import DIGITS, TINY, fork_runner
from lbsgd import strategies
from lbsgd.strategies.local_sgd import LocalSGD, LocalSGDOptions, group_matrix
from test_strategies import _config, batches, drive, flat, goyal_tx, train_steps


def local_sgd(k, d, schedule=None, switch_step=0, **options):
    return LocalSGD(options=LocalSGDOptions(**options), num_workers=k, num_devices=d, schedule=schedule,
                    switch_step=switch_step)


def worker(tree, w):
    return jax.tree.map(lambda t: t[w], tree)


def test_h1_with_local_momentum_equals_allreduce_sgd():
    """Momentum is linear: the average of the workers' Goyal steps is the step on the average gradient."""
    k, d = 8, 2
    data = batches(20, k, seed=3)
    ref = train_steps(strategies.Allreduce(), k, d, data)
    got = train_steps(local_sgd(k, d, period=1), k, d, data)
    for w in range(k):
        assert np.abs(flat(worker(got.params, w)) - flat(ref.params)).max() <= 1e-5, w
    np.testing.assert_allclose(flat(got.batch_stats), flat(ref.batch_stats), atol=1e-5)


def test_h4_is_k_independent_runs_between_averages_and_their_mean_at_one():
    k, d, h = 4, 2, 4
    data = batches(h + 1, k, seed=4)
    tx, schedule = goyal_tx(k)  # the schedule of the global kn, which the workers use
    seen = []
    train_steps(local_sgd(k, d, period=h), k, d, data, tx=tx, schedule=schedule, on_step=seen.append)
    n = data[0][0].shape[0] // k
    alone = {w: [(x[w * n : (w + 1) * n], y[w * n : (w + 1) * n]) for x, y in data] for w in range(k)}
    runs = {w: [] for w in range(k)}
    for w in range(k):
        train_steps(strategies.Allreduce(), 1, 1, alone[w][:h], tx=tx, schedule=schedule, on_step=runs[w].append)
    for t in range(h - 1):  # before the average: worker w is exactly its own single-worker run
        for w in range(k):
            assert np.abs(flat(worker(seen[t].params, w)) - flat(runs[w][t].params)).max() <= 1e-6, (t, w)
    mean = jax.tree.map(lambda *p: np.mean(np.stack(p), 0), *[runs[w][h - 1].params for w in range(k)])
    for w in range(k):  # at the average: every worker holds the mean of the k runs
        assert np.abs(flat(worker(seen[h - 1].params, w)) - flat(mean)).max() <= 1e-6, w
    for w in range(k):  # after it: each continues alone from the mean, with its own momentum and BN statistics

        def from_mean(state, lay, w=w):
            last = runs[w][h - 1]
            host = last.replace(params=mean)
            return jax.tree.map(lambda new, old: jax.device_put(np.asarray(new), old.sharding), host, state)

        ref = train_steps(strategies.Allreduce(), 1, 1, alone[w][h:], tx=tx, schedule=schedule, state_fn=from_mean)
        assert np.abs(flat(worker(seen[h].params, w)) - flat(ref.params)).max() <= 1e-6, w


def test_slowmo_beta0_alpha1_is_plain_local_sgd_and_bn_averaging_keeps_the_evaluated_statistics():
    k, d = 4, 2
    data = batches(6, k, seed=5)
    tx, schedule = goyal_tx(k)
    base = local_sgd(k, d, schedule, period=2)
    plain = train_steps(base, k, d, data, tx=tx, schedule=schedule)
    slow = local_sgd(k, d, schedule, period=2, outer="slowmo", slowmo_beta=0.0, slowmo_alpha=1.0, bn_stats="average")
    got = train_steps(slow, k, d, data, tx=tx, schedule=schedule)
    assert np.abs(flat(got.params) - flat(plain.params)).max() <= 1e-5
    assert np.abs(flat(slow.eval_params(got.params, got.extra)) - flat(base.eval_params(plain.params, plain.extra))).max() <= 1e-5
    # bn_stats='average': after an average every worker holds the mean; the mean (what evaluation uses) is unchanged
    stats = flat(jax.tree.map(lambda t: t - t[:1], got.batch_stats))
    assert np.abs(stats).max() <= 1e-6
    mean = lambda s: flat(jax.tree.map(lambda t: t.mean(0), s))  # noqa: E731
    assert np.abs(mean(got.batch_stats) - mean(plain.batch_stats)).max() <= 1e-5
    assert float(got.extra["consensus"]) > 0 and float(plain.extra["consensus"]) > 0


@pytest.mark.parametrize("outer", ["slowmo", "nesterov"])
def test_two_outer_rounds_on_a_quadratic_by_hand(outer):
    """k = 2, H = 2, plain SGD inside on f_i(x) = ½‖x − c_i‖²; SlowMo (γ = the inner rate) or DiLoCo's
    Nesterov outer step on Δ = x₀ − x̄, computed here in numpy."""
    k, lr, h = 2, 0.1, 2
    c = np.array([[1.0, -2.0], [3.0, 0.5]])
    x0 = np.array([0.5, 0.25])
    opts = dict(slowmo_beta=0.6, slowmo_alpha=0.8) if outer == "slowmo" else dict(outer_lr=0.7, outer_momentum=0.9)
    strategy = local_sgd(k, 2, optax.constant_schedule(lr), period=h, outer=outer, **opts)
    out = drive(strategy, k, 2, x0, c.astype(np.float32), lr, 2 * h)
    x, u = np.stack([x0, x0]), np.zeros(2)
    for t in range(2 * h):
        x = x - lr * (x - c)
        if (t + 1) % h == 0:
            delta = x0 - x.mean(0)
            if outer == "slowmo":
                u = 0.6 * u + delta / lr
                x0 = x0 - 0.8 * lr * u
            else:
                u = 0.9 * u + delta
                x0 = x0 - 0.7 * (delta + 0.9 * u)
            x = np.stack([x0, x0])
        params, extra, _ = out[t]
        np.testing.assert_allclose(params["x"], x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(extra["outer"]["x"], x0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(extra["outer_momentum"]["x"], u, rtol=1e-5, atol=1e-6)


def test_hierarchical_mixing_is_the_block_matrices_on_8_2_1_devices():
    """One-hot models through the real apply (zero rate): groups of 4 every 2 steps, all 8 every 4."""
    k = 8
    groups = np.zeros((k, k))
    groups[:4, :4] = groups[4:, 4:] = 0.25
    np.testing.assert_array_equal(group_matrix(k, 4), groups)
    want = [np.eye(k), groups, groups, np.full((k, k), 1 / k)]
    for d in (8, 2, 1):
        strategy = local_sgd(k, d, period=2, group_size=4, global_period=4, momentum="average")
        out = drive(strategy, k, d, np.zeros(k), np.zeros((k, k), np.float32), 0.0, 4,
                    override=lambda p, e: ({"x": jnp.eye(k)}, e))
        for t, (params, _, _) in enumerate(out):
            np.testing.assert_allclose(params["x"], want[t], atol=1e-7, err_msg=f"d={d}, step {t}")


def test_post_local_is_h1_before_the_switch_and_periodic_after_it():
    k, d, s, h = 4, 2, 4, 4
    data = batches(s + 2 * h, k, seed=6)
    tx, schedule = goyal_tx(k)
    seen = []
    train_steps(local_sgd(k, d, schedule, s, period=h, post_local=True), k, d, data, tx=tx, schedule=schedule,
                on_step=seen.append)
    before = []
    train_steps(local_sgd(k, d, schedule, period=1), k, d, data[:s], tx=tx, schedule=schedule, on_step=before.append)
    for t in range(s):
        np.testing.assert_array_equal(flat(seen[t]), flat(before[t]))  # bit for bit: allreduce with local momentum

    def from_switch(state, lay):
        return jax.tree.map(lambda new, old: jax.device_put(np.asarray(new), old.sharding), before[-1], state)

    after = []
    train_steps(local_sgd(k, d, schedule, period=h), k, d, data[s:], tx=tx, schedule=schedule,
                state_fn=from_switch, on_step=after.append)
    for t in range(2 * h):
        np.testing.assert_array_equal(flat(seen[s + t]), flat(after[t]))
        spread = np.abs(flat(jax.tree.map(lambda p: p - p[:1], seen[s + t].params))).max()
        assert (spread == 0) == ((t + 1) % h == 0), (t, spread)  # averaged at s + h, s + 2h only


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"local_sgd.period": 0}, "config.local_sgd.period=0 must be a positive integer"),
        ({"local_sgd.group_size": 3, "local_sgd.global_period": 8}, "config.local_sgd.group_size=3 must divide config.num_workers=8"),
        ({"local_sgd.group_size": 8, "local_sgd.global_period": 8}, "group_size=8 must divide"),
        ({"local_sgd.group_size": 1}, "config.local_sgd.group_size=1 must be 0 (off) or an integer >= 2"),
        ({"local_sgd.group_size": 4, "local_sgd.global_period": 6}, "global_period=6 must be a multiple of"),
        ({"local_sgd.group_size": 4}, "global_period=0 must be a multiple of"),
        ({"local_sgd.global_period": 8}, "global_period applies only with hierarchical averaging"),
        ({"local_sgd.outer": "adam"}, "config.local_sgd.outer='adam' is unknown"),
        ({"local_sgd.inner": "lamb"}, "config.local_sgd.inner='lamb' is unknown"),
        ({"local_sgd.momentum": "keep"}, "config.local_sgd.momentum='keep' is unknown"),
        ({"local_sgd.bn_stats": "sync"}, "config.local_sgd.bn_stats='sync' is unknown"),
        ({"local_sgd.worker_lr": "k"}, "config.local_sgd.worker_lr='k' is unknown"),
        ({"local_sgd.outer": "slowmo", "local_sgd.slowmo_beta": 1.0}, "slowmo_beta=1.0 must be a number in [0, 1)"),
        ({"local_sgd.outer": "nesterov", "local_sgd.outer_lr": 0.0}, "outer_lr=0.0 must be a number > 0"),
        ({"local_sgd.slowmo_beta": 0.3}, "slowmo_beta applies only with config.local_sgd.outer='slowmo'"),
        ({"local_sgd.outer_momentum": 0.5}, "outer_momentum applies only with config.local_sgd.outer='nesterov'"),
        ({"local_sgd.adamw_lr": 0.01}, "adamw_lr applies only with config.local_sgd.inner='adamw'"),
        ({"local_sgd.inner": "adamw", "local_sgd.worker_lr": "n"}, "worker_lr='n' applies only with"),
        ({"local_sgd.switch_epoch": 5.0}, "switch_epoch applies only with config.local_sgd.post_local=True"),
        ({"local_sgd.post_local": True, "local_sgd.switch_epoch": -2.0}, "switch_epoch=-2.0 must be -1"),
        ({"local_sgd.post_local": True, "local_sgd.switch_epoch": 3.0}, "is after the run's last epoch 1"),
    ],
)
def test_bad_local_sgd_options_are_one_line(fields, message):
    from lbsgd import validate

    with pytest.raises(validate.ConfigError) as e:
        validate.check_config(_config(strategy="local_sgd", **fields))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_good_options_pass_and_resolve():
    from lbsgd import validate

    for fields in ({"local_sgd.group_size": 4, "local_sgd.global_period": 8},
                   {"local_sgd.outer": "nesterov", "local_sgd.inner": "adamw", "local_sgd.adamw_lr": 0.003},
                   {"local_sgd.post_local": True, "local_sgd.switch_epoch": 0.5}):
        validate.check_config(_config(strategy="local_sgd", **fields))
    c = _config(strategy="local_sgd", num_epochs=20)
    c.local_sgd.post_local, c.local_sgd.worker_lr = True, "n"
    s = strategies.from_config(c, 1)
    assert s.switch_epoch == 2 + (20 - 2) / 2  # cosine: the middle of the decay phase
    assert s.lr_ratio == pytest.approx(1 / 8)  # linear scaling: the rate for n is the rate for kn / k
    c.decay, c.decay_epochs = "step", (6, 9)
    assert strategies.from_config(c, 1).switch_epoch == 6  # the first decay (Lin et al.)
    s = strategies.from_config(c, 1).bind(lambda t: 0.1, 44)
    assert s.switch_step == 6 * 44 and s.switch_fraction == pytest.approx(6 / 20)
    flat_h = local_sgd(8, 1, period=4)
    hier = local_sgd(8, 1, period=4, group_size=4, global_period=16)
    assert flat_h.bytes_sent_per_worker_per_step(8, 1000) == pytest.approx(2 * 7 / 8 * 1000 / 4)
    assert hier.bytes_by_level(8, 1000) == pytest.approx({"global": 2 * 7 / 8 * 1000 / 16,
                                                          "group": 2 * 3 / 4 * 1000 * (1 / 4 - 1 / 16)})


def _run_args(workdir, data_dir):
    return [DIGITS, f"--workdir={workdir}", f"--config.data_dir={data_dir}", *TINY, "--config.strategy=local_sgd",
            "--config.local_sgd.period=4", "--config.num_epochs=1", "--config.checkpoint_every_steps=6"]


def test_killed_run_resumes_to_the_same_result(tmp_path, data_dir):
    """kill -9 mid-run (mid-round: checkpoints every 6 steps, averages every 4), rerun: the same results."""
    ref = fork_runner().run(*_run_args(tmp_path / "ref", data_dir))
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = _read(tmp_path / "ref" / "results.json")
    proc = fork_runner().start(*_run_args(tmp_path / "run", data_dir))
    ckpts, deadline = tmp_path / "run" / "checkpoints", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpts.exists() and any(d.isdigit() and int(d) >= 18 for d in os.listdir(ckpts)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = fork_runner().run(*_run_args(tmp_path / "run", data_dir))
    assert rerun.returncode == 0 and "resumed from checkpoint at step" in rerun.stderr, rerun.stderr[-3000:]
    got = _read(tmp_path / "run" / "results.json")
    for field in ("eval_accuracy", "eval_loss", "train_loss", "steps", "consensus_distance",
                  "consensus_distance_before_last_average"):
        assert got[field] == pytest.approx(want[field], rel=1e-6, abs=1e-7), field
    assert got["period"] == 4 and got["outer"] == "average" and got["steps"] == 44
    assert got["bytes_sent_per_worker_per_step"] == pytest.approx(2 * 7 / 8 * 4 * got["num_params"] / 4)
    assert got["consensus_distance_before_last_average"] > 0


def _read(path):
    import json

    with open(path) as f:
        return json.load(f)
