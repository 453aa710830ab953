"""Stragglers (lbsgd.stragglers): CV 0 is the α-β model exactly; a synchronous step lasts the expected maximum
of k lognormals; the simulated parameter server's staleness matches an event-driven computation written here;
the schedule drives the jitted async_ps step the same way on 1 and 2 devices; seeded; bad input is one line."""

import heapq
import json
import os
import types

import ml_collections
import numpy as np
import pytest
from conftest import REPO, main_here, read_csv
from scipy import integrate, stats

from lbsgd import compare, runs, straggler_report, stragglers, strategies
from lbsgd.config import schema
from lbsgd.errors import ConfigError

ALPHA, BETA = 50e-6, 8 / 10e9  # 10 GbE


def _strategy(overrides, k=8):
    """The strategy of one comparison setting at k workers, built from the base config like a run."""
    config = schema.base_config()
    with config.unlocked():
        config.num_workers = k
        for o in overrides:
            field, value = o.format(k=k, k_minus_1=k - 1).split("=", 1)
            section, _, name = field.rpartition(".")
            target = config[section] if section else config
            target[name] = type(target[name])(value) if not isinstance(target[name], bool) else value == "True"
    return strategies.from_config(ml_collections.ConfigDict(config.to_dict()), k)


def test_cv_zero_reproduces_the_alpha_beta_step_times_of_every_strategy():
    """CV 0: the straggler columns are the α-β formula itself (exactly), and a table of equal times gives it
    through the recurrence too (to rounding), for every registered comparison setting."""
    k, compute, steps = 8, 0.1, 320  # every period divides the steps after the post-local switch (0.55 of them)
    args = types.SimpleNamespace(straggler_cv=[0.0], straggler_trace=None, target_error=None)
    row = {"num_workers": k, "num_params": 78_000, "steps": steps, "seed": 0}
    for label, overrides in compare.registry.compare_entries():
        strategy = _strategy(overrides, k)
        plain = compare.modelled_times(strategy, row, compute)
        cols = straggler_report.step_columns(args, row, compute, lambda c, s=strategy: compare.modelled_times(s, row, c))
        assert {key: cols[f"step_s cv=0 {key}"] for key in plain} == plain, label  # bit for bit
        table = stragglers.compute_times(steps, k, compute, 0.0)
        for key, want in plain.items():
            nbytes = compare.model_sizes(row)[key.split(" ", 1)[1]]
            alpha, beta = {"10GbE": (ALPHA, BETA), "IB56": (5e-6, 8 / 56e9)}[key.split(" ")[0]]
            assert strategy.step_time(table, k, nbytes, alpha, beta) == pytest.approx(want, rel=1e-9), (label, key)


def _expected_max(k, cv):
    """E[max of k i.i.d. lognormals of mean 1 and coefficient of variation cv] = ∫₀^∞ 1 − F(x)^k dx."""
    sigma = np.sqrt(np.log1p(cv**2))
    dist = stats.lognorm(s=sigma, scale=np.exp(-sigma**2 / 2))
    value, _ = integrate.quad(lambda x: 1 - dist.cdf(x) ** k, 0, np.inf, limit=200)
    return value


@pytest.mark.parametrize("k", [8, 64])
@pytest.mark.parametrize("cv", [0.1, 0.5])
def test_synchronous_step_is_the_expected_maximum_of_k_lognormals(k, cv):
    steps = 6000
    table = stragglers.compute_times(steps, k, 1.0, cv, seed=3)
    assert table.mean() == pytest.approx(1.0, rel=0.02) and table.std() == pytest.approx(cv, rel=0.05)
    got = strategies.Allreduce().step_time(table, k, 0.0, 0.0, 0.0)  # no communication: compute waits only
    assert got == pytest.approx(_expected_max(k, cv), rel=0.02)
    # Neighbour waits never take longer than the barrier, and longer than no waiting at all.
    ring = strategies.DPSGD(topology="ring", form="atc", num_workers=k).step_time(table, k, 0.0, 0.0, 0.0)
    assert table.sum(0).max() / steps <= ring <= got


def _event_driven(cycles, num_updates):
    """The parameter server event by event (heapq): every worker pulls, computes, pushes, pulls again; the
    server applies pushes in (time, worker) order; staleness = updates applied between pull and push."""
    k = cycles.shape[1]
    heap = [(cycles[0, i], i, 0) for i in range(k)]
    heapq.heapify(heap)
    version, applied, staleness = np.zeros(k, int), 0, []
    pulls = [[] for _ in range(k)]  # the version each pull after the start got
    while applied < num_updates:
        time, i, j = heapq.heappop(heap)
        staleness.append(applied - version[i])
        applied += 1
        version[i] = applied  # pulls right after its own push is applied
        pulls[i].append(applied)
        heapq.heappush(heap, (time + cycles[j + 1, i], i, j + 1))
    return np.array(staleness), pulls


@pytest.mark.parametrize("cv", [0.0, 0.3, 1.0])
def test_simulated_staleness_matches_an_event_driven_computation(cv):
    k, rounds = 6, 300
    rng = np.random.default_rng(11)
    cycles = np.full((4 * rounds, k), 1.0) if cv == 0 else rng.lognormal(0.0, cv, size=(4 * rounds, k))
    cycles[:, 0] *= 1.7 if cv else 1.0  # one slow worker
    schedule = stragglers.simulate_ps(lambda j: cycles[:j], k * rounds)
    want, pulls = _event_driven(cycles, k * rounds)
    got = schedule.staleness_stats()
    assert got["mean"] == pytest.approx(want.mean()) and got["max"] == want.max()
    assert got["histogram"] == np.bincount(want).tolist()
    if cv == 0:
        assert set(want[k:]) == {k - 1}  # in lockstep every gradient is k − 1 updates old
    # The rounds the trainer refreshes in: a pull of version v refreshes after round ⌈v/k⌉ − 1.
    refresh = stragglers.refresh_table(schedule, rounds)
    for i in range(k):
        expect = sorted({(v - 1) // k for v in pulls[i] if v <= k * rounds})
        assert np.flatnonzero(refresh[:, i]).tolist() == expect, i


def _simulated(k, seed, cv, steps):
    return strategies.AsyncPS(delay="simulated", straggler_cv=cv, seed=seed, num_workers=k, num_steps=steps)


def test_simulated_pulls_drive_the_jitted_step_alike_on_1_and_2_devices():
    """Least squares with the simulated schedule: x_{t+1} = x_t − η Σ_i ∇f_i(x_{t − a_i(t)}), a the ages of the
    refresh table; the same parameters and ages on 2 devices as on 1."""
    from test_strategies import drive

    k, lr, steps, cv = 4, 0.05, 12, 1.0
    rng = np.random.default_rng(2)
    c = rng.normal(size=(k, 3)).astype(np.float32)
    init = rng.normal(size=3)
    strategy = _simulated(k, 5, cv, steps)
    ages = stragglers.ages(strategy.refresh_table())
    assert ages.max() >= 1 and len({tuple(a) for a in ages.T}) > 1  # stale, and not in lockstep
    outs = {d: drive(strategy, k, d, init, c, lr, steps) for d in (1, 2)}
    history = [init]
    for t in range(steps):
        grad = sum(history[t - ages[t, i]] - c[i] for i in range(k))
        history.append(history[t] - lr * grad)
        for d, out in outs.items():
            params, _, metrics = out[t]
            np.testing.assert_allclose(params["x"], history[-1], rtol=1e-5, atol=1e-5)
            assert metrics["staleness_max"] == ages[t].max(), (d, t)
    np.testing.assert_array_equal(outs[1][-1][0]["x"], outs[2][-1][0]["x"])


def test_times_and_schedules_are_functions_of_seed_step_and_worker():
    a = stragglers.compute_times(50, 8, 0.2, 0.5, seed=4)
    np.testing.assert_array_equal(a, stragglers.compute_times(50, 8, 0.2, 0.5, seed=4))
    np.testing.assert_array_equal(a[10:30, :3], stragglers.compute_times(20, 3, 0.2, 0.5, seed=4, start=10))
    assert not np.array_equal(a, stragglers.compute_times(50, 8, 0.2, 0.5, seed=5))
    one = _simulated(8, 4, 0.5, 40).refresh_table()
    np.testing.assert_array_equal(one, _simulated(8, 4, 0.5, 60).refresh_table()[:40])  # any run length
    assert not np.array_equal(one, _simulated(8, 5, 0.5, 40).refresh_table())


def test_a_trace_is_replayed_cyclically(tmp_path):
    (tmp_path / "t.csv").write_text("w0,w1\n0.1,0.2\n0.3,0.4\n0.5,0.6\n")
    (tmp_path / "t.json").write_text(json.dumps({"times": [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]}))
    for name in ("t.csv", "t.json"):
        trace = stragglers.load_trace(str(tmp_path / name))
        got = stragglers.compute_times(4, 3, 99.0, trace=trace, start=2)
        np.testing.assert_allclose(got, [[0.5, 0.6, 0.5], [0.1, 0.2, 0.1], [0.3, 0.4, 0.3], [0.5, 0.6, 0.5]])
    assert strategies.Allreduce().step_time(got, 3, 0.0, 0.0, 0.0) == pytest.approx((0.6 + 0.2 + 0.4 + 0.6) / 4)


@pytest.mark.parametrize("text", ["", "1,2\nx,3\n", "[[1, -2]]", "[[1, 2], [3]]"])
def test_bad_trace_files_and_cvs_are_one_line(tmp_path, text):
    path = tmp_path / ("t.json" if text.startswith("[") else "t.csv")
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        stragglers.load_trace(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    for cv in (-0.1, float("nan"), "0.5", True):
        with pytest.raises(ConfigError):
            stragglers.lognormal_params(cv)
    assert strategies.registry.REGISTRY["async_ps"].options(delay="simulated", straggler_cv=-1).validate()


@pytest.mark.parametrize("flag,message", [("--straggler_cv=0,-1", "comma-separated"),
                                          ("--straggler_trace=nope.csv", "does not exist")])
def test_compare_bad_straggler_flags_are_one_line(tmp_path, capsys, flag, message):
    with pytest.raises(SystemExit) as e:
        compare.parse(["--config=experiments/digits.py", f"--workdir={tmp_path}", flag])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_compare_adds_straggler_and_time_to_target_columns(tmp_path, capsys, monkeypatch):
    """Runs stood in for by results.json files: cv=0 columns equal the plain ones, stragglers only slow a
    synchronous step down, and the time to target = the first step at the target error × s/step."""

    def fake_launch(argv, log_path, env):
        workdir = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
        easgd = "easgd" in workdir
        results = {"eval_accuracy": 0.9 if easgd else 0.95, "num_workers": 8, "per_worker_batch_size": 16,
                   "steps": 30, "devices": 8, "num_params": 78_000, "images_per_second": 1000.0,
                   "consensus_distance": 0.0, "bytes_sent_per_worker_per_step": 1.0}
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f)
        with open(os.path.join(workdir, "eval_history.jsonl"), "w") as f:
            f.writelines(json.dumps({"step": step, "epoch": step / 10, "eval_accuracy": acc}) + "\n" for step, acc in ((10, 0.5), (20, 0.9), (30, results["eval_accuracy"])))
        return 0, ""

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(runs, "launch_main", fake_launch)
    done = main_here(compare, ["--config=experiments/digits.py", f"--workdir={tmp_path}", "--workers=8", "--seeds=0",
                               "--strategies=allreduce,easgd tau=10", "--straggler_cv=0,0.5"], capsys)
    assert done.returncode == 0, done.stderr
    rows = read_csv(tmp_path / "compare.csv")
    for r in rows:
        assert float(r["target_error"]) == pytest.approx(10.0)  # the worst final error at k = 8 (easgd's)
        for panel in compare.time_panels():
            plain = float(r[f"step_s {panel}"])
            assert float(r[f"step_s cv=0 {panel}"]) == plain
            assert float(r[f"step_s cv=0.5 {panel}"]) > plain
            assert float(r[f"time_to_target_s cv=0.5 {panel}"]) == pytest.approx(20 * float(r[f"step_s cv=0.5 {panel}"]))
    table = (tmp_path / "compare.md").read_text()
    assert table.count("**Stragglers,") == 4 and "s to target cv=0.5" in table
