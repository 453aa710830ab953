"""The main job as a user runs it: bad input, an end-to-end run, and resume after a crash."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_main

DIGITS = "--config=experiments/digits.py"
TINY = [
    "--config.model=resnet8",
    "--config.model_width=8",
    "--config.per_worker_batch_size=4",
    "--config.log_every_steps=4",
    "--config.eval_every_epochs=0",
]

BAD_INPUTS = {
    "workers_not_multiple_of_devices": (["--config.num_workers=6"], "config.num_workers=6"),
    "fewer_workers_than_devices": (["--config.num_workers=4"], "config.num_workers=4"),
    "per_worker_batch_zero": (["--config.per_worker_batch_size=0"], "config.per_worker_batch_size"),
    "global_batch_larger_than_dataset": (["--config.per_worker_batch_size=200"], "larger than the 1437"),
    "unknown_dataset": (["--config.dataset=mnist"], "config.dataset"),
    "unknown_strategy": (["--config.strategy=carrier_pigeon"], "config.strategy"),
    "unknown_warmup": (["--config.warmup=linear"], "config.warmup"),
    "unknown_model": (["--config.model=resnet9"], "config.model"),
    "zero_learning_rate": (["--config.base_learning_rate=0.0"], "config.base_learning_rate"),
    "negative_learning_rate": (["--config.base_learning_rate=-0.1"], "config.base_learning_rate"),
    "zero_epochs": (["--config.num_epochs=0"], "config.num_epochs"),
    "unknown_override": (["--config.num_wrokers=8"], "num_wrokers"),
    "missing_config_file": (["--config=experiments/no_such_file.py"], "no_such_file.py"),
    "missing_config_file_space_form": (["--config", "experiments/no_such_file.py"], "'experiments/no_such_file.py'"),
    "unwritable_workdir": (["--workdir={file}/sub"], "--workdir"),
    "unknown_topology": (["--config.strategy=dpsgd", "--config.topology=torus"], "config.topology='torus'"),
    "topology_needs_more_workers": (
        ["--config.strategy=dpsgd", "--config.num_workers=2", "--config.topology=ring"],
        "needs at least 3 workers",
    ),
    "option_of_another_strategy": (["--config.dpsgd.form=atc"], "config.dpsgd.form is an option of strategy dpsgd"),
    "aggregation_for_decentralized": (["--config.strategy=gossip_pull", "--config.aggregation=ring"], "allreduce"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, data_dir):
    """Run every bad input once, a few at a time (each is a separate `python -m lbsgd.main`)."""
    tmp = tmp_path_factory.mktemp("bad")
    blocker = tmp / "a_file"
    blocker.write_text("not a directory")

    def one(name):
        extra, _ = BAD_INPUTS[name]
        extra = [a.replace("{file}", str(blocker)) for a in extra]
        args = [DIGITS, f"--workdir={tmp / name}", f"--config.data_dir={data_dir}"]
        args = [
            a
            for a in args
            if not (a.startswith("--config=") and any(e == "--config" or e.startswith("--config=") for e in extra))
        ]
        args = [a for a in args if not (a.startswith("--workdir") and any(e.startswith("--workdir") for e in extra))]
        return name, run_main(*args, *extra, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return dict(pool.map(one, BAD_INPUTS))


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(bad_runs, name):
    proc = bad_runs[name]
    _, expected = BAD_INPUTS[name]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lbsgd: error: ") and expected in lines[0], lines[0]


def _read(path):
    with open(path) as f:
        return json.load(f)


STRATEGY_ARGS = {  # strategies whose own state must survive a crash: push-sum weights; stale copies and delays
    "allreduce": [],
    "gossip_push": ["--config.strategy=gossip_push"],
    "async_ps": ["--config.strategy=async_ps", "--config.async_ps.staleness=3", "--config.async_ps.delay=random"],
}


def _short_run(workdir, data_dir, strategy="allreduce"):
    """A short run: 2 epochs of k=8 x n=4 = 88 steps, checkpoints every 8."""
    return run_main(
        DIGITS,
        f"--workdir={workdir}",
        f"--config.data_dir={data_dir}",
        *TINY,
        *STRATEGY_ARGS[strategy],
        "--config.num_epochs=2",
        "--config.checkpoint_every_steps=8",
    )


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, data_dir):
    """Uninterrupted short runs, one per strategy in STRATEGY_ARGS, made on first use."""
    cache = {}

    def get(strategy):
        if strategy not in cache:
            workdir = tmp_path_factory.mktemp(f"ref_{strategy}")
            proc = _short_run(workdir, data_dir, strategy)
            assert proc.returncode == 0, proc.stderr[-3000:]
            cache[strategy] = (workdir, _read(workdir / "results.json"))
        return cache[strategy]

    return get


@pytest.fixture(scope="module")
def reference_run(reference_runs):
    """The uninterrupted allreduce run."""
    return reference_runs("allreduce")


def test_main_job_writes_results_events_and_checkpoints(reference_run):
    workdir, results = reference_run
    for field in (
        "eval_accuracy",
        "eval_loss",
        "train_loss",
        "steps",
        "epochs",
        "global_batch_size",
        "num_workers",
        "devices",
        "processes",
        "wall_time_s",
        "images_per_second",
    ):
        assert field in results, field
    assert results["steps"] == 2 * (1437 // 32) and results["epochs"] == 2.0
    assert results["global_batch_size"] == 32 and results["num_workers"] == 8 and results["devices"] == 8
    assert results["eval_examples"] == 360
    assert results["strategy"] == "allreduce" and results["aggregation"] == "psum"
    assert results["consensus_distance"] == 0.0  # one shared copy
    assert results["bytes_sent_per_worker_per_step"] == 2 * 7 / 8 * 4 * results["num_params"]  # ring allreduce
    assert 0.3 < results["eval_accuracy"] <= 1.0  # 2 tiny epochs already learn something (chance is 0.1)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    kept = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert kept[-1] == results["steps"] and len(kept) == 3  # keep the last 3


@pytest.mark.parametrize("strategy", sorted(STRATEGY_ARGS))
def test_killed_run_resumes_to_the_same_result(reference_runs, tmp_path, data_dir, strategy):
    _, want = reference_runs(strategy)
    args = [
        sys.executable,
        "-m",
        "lbsgd.main",
        DIGITS,
        f"--workdir={tmp_path}",
        f"--config.data_dir={data_dir}",
        *TINY,
        *STRATEGY_ARGS[strategy],
        "--config.num_epochs=2",
        "--config.checkpoint_every_steps=8",
    ]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpts.exists() and any(d.isdigit() and int(d) >= 16 for d in os.listdir(ckpts)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)  # a crash: no clean-up, maybe mid-save
    proc.wait()
    assert not (tmp_path / "results.json").exists()
    rerun = _short_run(tmp_path, data_dir, strategy)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from checkpoint at step" in rerun.stderr
    got = _read(tmp_path / "results.json")
    assert got["strategy"] == strategy
    for field in ("eval_accuracy", "eval_loss", "train_loss", "steps", "epochs", "consensus_distance"):
        assert got[field] == pytest.approx(want[field], rel=1e-6, abs=1e-7), field


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_rerun_resumes(tmp_path, data_dir):
    """Preemption: SIGTERM finishes the step, checkpoints it (off the periodic schedule) and exits 143."""
    args = [
        DIGITS,
        f"--workdir={tmp_path}",
        f"--config.data_dir={data_dir}",
        *TINY,
        "--config.num_epochs=5",
        "--config.checkpoint_every_steps=1000",
        "--config.log_every_steps=2",
    ]
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lbsgd.main", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=err
        )
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and "train_loss" not in err_path.read_text():
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    last = [ln for ln in err_path.read_text().splitlines() if ln.startswith("lbsgd:")][-1]
    assert "stopped by SIGTERM after step" in last and "rerun the same command" in last, last
    step = int(last.split("after step ")[1].split(";")[0])
    assert 0 < step < 5 * (1437 // 32)
    assert (tmp_path / "checkpoints" / str(step)).is_dir()  # saved at the stop, not only every 1000 steps
    rerun = run_main(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from checkpoint at step {step}" in rerun.stderr
    assert _read(tmp_path / "results.json")["steps"] == 5 * (1437 // 32)
