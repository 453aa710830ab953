"""lbsgd.compare (issue #10): the per-strategy time model against hand values, resume, outputs, bad flags."""

import csv
import os

import pytest

from conftest import REPO, forked_launch, main_here, run_module
from lbsgd import commcost, compare, runs, strategies


def test_time_model_of_every_strategy_by_hand():
    k, model, compute = 8, 1e8, 0.1  # 100 MB model, 100 ms of compute per step
    alpha, beta = 50e-6, 8 / 10e9  # 10 GbE
    msg = alpha + model * beta  # one message: 0.08005 s
    ring = 2 * (k - 1) * alpha + 2 * (k - 1) / k * model * beta  # 0.1407 s
    assert msg == pytest.approx(0.08005)
    assert ring == pytest.approx(0.1407)
    cases = [  # (strategy, k, hand value)
        (strategies.Allreduce(), k, compute + ring),
        (strategies.Allreduce(aggregation="halving_doubling"), k, compute + 2 * 3 * alpha + 2 * 7 / 8 * model * beta),
        (strategies.DPSGD(topology="ring", num_workers=k), k, max(compute, 2 * msg)),  # awc overlaps
        (strategies.DPSGD(topology="ring", form="atc", num_workers=k), k, compute + 2 * msg),
        (strategies.DPSGD(topology="exponential", form="atc", num_workers=k), k, compute + 3 * msg),
        (strategies.DPSGD(topology="one_peer_exponential", num_workers=k), k, max(compute, msg)),
        (strategies.GossipPull(num_workers=k), k, compute + msg),
        (strategies.GossipPush(num_workers=k), k, compute + alpha + (model + 4) * beta),
        (strategies.EASGD(period=10, num_workers=k), k, compute + ring / 10),
        (strategies.AsyncPS(staleness=7, num_workers=k), k, max(compute + msg * (1 + 1 / 8), k * msg * (1 + 1 / 8))),
        (strategies.AsyncPS(staleness=0, num_workers=1), 1, compute + 2 * msg),  # one worker: its own cycle
    ]
    for strategy, workers, want in cases:
        assert strategy.step_time(compute, workers, model, alpha, beta) == pytest.approx(want), strategy
    assert commcost.model_params(*commcost.NETWORKS["10GbE"], 0.0)[:2] == pytest.approx((alpha, beta))


TINY = ["--override", "model=resnet4", "--override", "model_width=8", "--override", "per_worker_batch_size=4",
        "--override", "max_steps=3", "--override", "checkpoint_every_steps=3"]


def test_compare_writes_outputs_and_resumes_without_rerunning(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(runs, "launch_main", forked_launch)  # the real lbsgd.main, forked (test_sweep.py: unforked)
    args = ["--config=experiments/digits.py", f"--workdir={tmp_path}", "--workers=8", "--seeds=0",
            "--strategies=allreduce,easgd tau=10", "--num_epochs=1", "--override", f"data_dir={data_dir}", *TINY]
    first = main_here(compare, args, capsys)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "[1/2] allreduce, k=8, seed 0" in first.stdout and "[2/2] easgd tau=10" in first.stdout
    results = [tmp_path / d / "results.json" for d in ("allreduce_k8_seed0", "easgd_tau_10_k8_seed0")]
    stamps = [os.stat(p).st_mtime_ns for p in results]
    with open(tmp_path / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["allreduce", "easgd tau=10"]
    assert float(rows[1]["bytes_sent_per_worker_per_step"]) == pytest.approx(
        float(rows[0]["bytes_sent_per_worker_per_step"]) / 10)  # one allreduce every 10 steps
    assert rows[1]["strategy"] == "easgd" and rows[1]["period"] == "10"
    for name in ("compare.md", "compare_epochs.png", "compare_time_k8.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    second = main_here(compare, args, capsys)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("already done") == 2
    assert [os.stat(p).st_mtime_ns for p in results] == stamps  # nothing was rerun


@pytest.mark.parametrize(
    "args,message",
    [
        (["--strategies=carrier_pigeon"], "unknown strategy label 'carrier_pigeon'"),
        (["--workers=8,x"], "comma-separated integers"),
        (["--config=experiments/nope.py"], "does not exist"),
        (["--override", "num_epochs"], "must look like"),
    ],
)
def test_compare_bad_flags_are_one_line(tmp_path, args, message):
    base = ["--config=experiments/digits.py", f"--workdir={tmp_path}"]
    base = [a for a in base if not any(a.split("=")[0] == b.split("=")[0] for b in args)]
    proc = run_module("lbsgd.compare", *base, *args, timeout=60)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
