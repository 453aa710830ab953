"""k workers anywhere (issue #5): the same run on any device count, with accumulation, and on several processes."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, fork_runner, run_module, tiny_config
from lbsgd import checkpoint, train
from lbsgd.launch import free_port

STEPS = 6
TINY_ARGS = [
    "--config=experiments/digits.py",
    "--config.model=resnet4",
    "--config.model_width=8",
    "--config.per_worker_batch_size=4",
    "--config.log_every_steps=2",
    "--config.eval_every_epochs=0",
]


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _summary(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    ckpt = checkpoint.load(str(workdir))
    return results, _flat((ckpt["params"], ckpt["batch_stats"], ckpt.get("extra", {})))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """k=8 workers on 8 devices of one process."""
    workdir = tmp_path_factory.mktemp("d8")
    train.train_and_evaluate(tiny_config(data_dir, max_steps=STEPS, checkpoint_every_steps=STEPS), str(workdir))
    return _summary(workdir)


def _launch(args, timeout=400):
    return run_module("lbsgd.launch", *args, timeout=timeout)


def _two_processes(args, devices_per_process=4, timeout=300):
    """``lbsgd.main`` ``args`` as process 0 and 1 of a 2-process run on this machine, as ``lbsgd.launch`` starts
    them (``devices_per_process`` simulated CPU devices each, a free coordinator port) but forked from the
    test process's ``forkrun`` server, without the supervisor (``lbsgd.launch`` and the supervisor are the
    subject of their own tests below). Returns both ``CompletedProcess``es."""
    runner = fork_runner()
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}", "LBSGD_SUPERVISED": "1"}
    coordinator = [f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2", "--heartbeat_timeout_s=30"]
    procs = [runner.start(*args, *coordinator, f"--process_id={i}", env=env) for i in range(2)]
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):  # one failed: its peer would wait for it, stop it
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
        time.sleep(0.05)
    for p in procs:
        p.wait(max(1.0, deadline - time.time()))
    return [p.completed() for p in procs]


LAYOUTS = {  # name: (num_devices, accumulation_steps) in this 8-device process. The whole run (data placement,
    # eval, checkpoint) with several workers per device, and with accumulation; the step alone on every
    # layout (8, 4, 2, 1 devices, 1 x 4 and 2 x 2 microsteps): test_train.py.
    "2 devices": (2, 1),
    "1 device, 4 accumulation microsteps": (1, 4),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_same_run_on_fewer_devices(reference, tmp_path, data_dir, name):
    d, acc = LAYOUTS[name]
    train.train_and_evaluate(
        tiny_config(data_dir, max_steps=STEPS, checkpoint_every_steps=STEPS, num_devices=d, accumulation_steps=acc),
        str(tmp_path),
    )
    (want, want_params), (got, got_params) = reference, _summary(tmp_path)
    assert got["devices"] == d and got["workers_per_device"] == 8 // d
    for field in ("train_loss", "eval_loss", "eval_accuracy"):
        assert got[field] == pytest.approx(want[field], rel=1e-5, abs=1e-6), field
    diff = np.abs(got_params - want_params).max()
    print(f"{name}: max |param diff| vs 8 devices = {diff:.3g}")
    assert diff <= 1e-5


def test_same_run_on_two_processes(reference, tmp_path, data_dir):
    """2 processes x 2 devices x 2 workers each (2 x 4 devices: the strategies' test below)."""
    devices_per_process = 2
    procs = _two_processes(
        [
            *TINY_ARGS,
            f"--workdir={tmp_path}",
            f"--config.data_dir={data_dir}",
            f"--config.max_steps={STEPS}",
            "--config.num_epochs=1",
            f"--config.checkpoint_every_steps={STEPS}",
        ],
        devices_per_process,
    )
    assert [p.returncode for p in procs] == [0, 0], [p.stderr[-2000:] for p in procs]
    (want, want_params), (got, got_params) = reference, _summary(tmp_path)
    assert got["processes"] == 2 and got["devices"] == 2 * devices_per_process
    for field in ("train_loss", "eval_loss", "eval_accuracy"):
        assert got[field] == pytest.approx(want[field], rel=1e-5, abs=1e-6), field
    diff = np.abs(got_params - want_params).max()
    print(f"2 processes x {devices_per_process} devices: max |param diff| vs 1 process x 8 devices = {diff:.3g}")
    assert diff <= 1e-5


STRATEGY_CASES = {  # strategy -> config overrides that make its own state non-trivial within STEPS steps
    "gossip_pull": {"strategy": "gossip_pull"},
    "easgd": {"strategy": "easgd", "easgd.period": 2},
    "async_ps": {"strategy": "async_ps", "async_ps.staleness": 2, "async_ps.delay": "random"},
}


@pytest.mark.parametrize("name", sorted(STRATEGY_CASES))
def test_strategy_same_run_on_two_processes(tmp_path_factory, data_dir, name):
    """Per-worker state across processes: the same peers, draws and run on 1 process x 8 devices and 2 x 4."""
    overrides = STRATEGY_CASES[name]
    ref_dir, mp_dir = tmp_path_factory.mktemp(f"{name}_ref"), tmp_path_factory.mktemp(f"{name}_mp")
    config = tiny_config(data_dir, max_steps=STEPS, checkpoint_every_steps=STEPS)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        (config[parents[0]] if parents else config)[leaf] = value
    train.train_and_evaluate(config, str(ref_dir))
    procs = _two_processes(
        [
            *TINY_ARGS,
            f"--workdir={mp_dir}",
            f"--config.data_dir={data_dir}",
            f"--config.max_steps={STEPS}",
            "--config.num_epochs=1",
            f"--config.checkpoint_every_steps={STEPS}",
            *[f"--config.{key}={value}" for key, value in overrides.items()],
        ]
    )
    assert [p.returncode for p in procs] == [0, 0], [p.stderr[-2000:] for p in procs]
    (want, want_state), (got, got_state) = _summary(ref_dir), _summary(mp_dir)
    assert got["processes"] == 2 and got["strategy"] == name
    for field in ("train_loss", "eval_loss", "eval_accuracy", "consensus_distance"):
        assert got[field] == pytest.approx(want[field], rel=1e-5, abs=1e-6), field
    assert want["consensus_distance"] > 0  # the workers (or their pulled copies) really differ
    diff = np.abs(got_state - want_state).max()
    print(f"{name}, 2 processes x 4 devices: max |state diff| vs 1 process x 8 devices = {diff:.3g}")
    assert diff <= 1e-5


def test_dead_peer_survivor_exits_with_clear_message_and_the_run_resumes(tmp_path, data_dir, caplog):
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONUNBUFFERED="1")
    args = [
        *TINY_ARGS,
        f"--workdir={tmp_path}",
        f"--config.data_dir={data_dir}",
        "--config.num_epochs=1",
        "--config.checkpoint_every_steps=4",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        "--heartbeat_timeout_s=10",
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "lbsgd.main", *args, f"--process_id={i}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for i in range(2)
    ]
    ckpts = tmp_path / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if ckpts.exists() and any(d.isdigit() and int(d) >= 8 for d in os.listdir(ckpts)):
            break
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), "a process ended before the peer could be killed"
    os.killpg(procs[1].pid, signal.SIGKILL)  # process 1 (its supervisor and trainer) dies
    t_kill = time.time()
    try:
        _, err = procs[0].communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(procs[0].pid, signal.SIGKILL)
        pytest.fail("the survivor hung for more than 120 s after its peer died")
    procs[1].wait()
    waited = time.time() - t_kill
    print(f"survivor exited {waited:.1f} s after its peer was killed")
    assert procs[0].returncode != 0
    last = [ln for ln in err.splitlines() if ln.startswith("lbsgd: error:")]
    assert last and "process 0" in last[-1] and "rerun" in last[-1], err[-2000:]
    assert not (tmp_path / "results.json").exists()
    # The last checkpoint is intact: the same run resumes from it and finishes (here on 1 process x 8 devices,
    # the same workers; the 2-process resume is the SIGTERM test's below).
    saved = checkpoint.steps(str(tmp_path))
    assert saved and saved[-1] >= 8
    with caplog.at_level(logging.INFO, logger="lbsgd"):
        results = train.train_and_evaluate(tiny_config(data_dir, num_epochs=1, checkpoint_every_steps=4), str(tmp_path))
    assert f"resumed from checkpoint at step {saved[-1]}" in caplog.text
    assert results["steps"] == 1437 // 32 and np.isfinite(results["train_loss"])
    assert (tmp_path / "results.json").exists()


def test_launcher_fails_when_a_process_fails(tmp_path):
    proc = _launch(
        [
            "--num_processes=2",
            "--devices_per_process=4",
            "--",
            *TINY_ARGS,
            f"--workdir={tmp_path}",
            "--config.num_workers=6",
        ],
        timeout=120,
    )
    assert proc.returncode != 0
    assert "exited with status 2" in proc.stderr
    assert "config.num_workers=6" in proc.stdout


def test_launcher_port_taken_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        proc = _launch([f"--port={port}", "--", *TINY_ARGS, f"--workdir={tmp_path}"], timeout=60)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"port {port}" in lines[0] and "in use" in lines[0]


def _start_two(tmp_path, data_dir, extra, port):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONUNBUFFERED="1")
    args = [
        *TINY_ARGS,
        f"--workdir={tmp_path}",
        f"--config.data_dir={data_dir}",
        *extra,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
    ]
    errs = [tmp_path / f"stderr{i}.txt" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "lbsgd.main", *args, f"--process_id={i}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(errs[i], "w"),
            start_new_session=True,
        )
        for i in range(2)
    ]
    return procs, errs


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_rerun_resumes(tmp_path, data_dir):
    """Preemption of one host: JAX's preemption sync point (CheckpointManager.reached_preemption) makes both
    processes checkpoint the same step and stop; the same command resumes."""
    # 2 epochs (88 steps): the preemption notice travels through JAX's coordination service (a notifier thread,
    # then a key every process watches); on this 2-core machine under the full suite's load a 1-epoch run
    # (44 steps, ~6 s once compiled) once finished before the processes agreed on a step to stop at.
    extra = ["--config.num_epochs=2", "--config.checkpoint_every_steps=1000", "--config.log_every_steps=2"]
    procs, errs = _start_two(tmp_path, data_dir, extra, free_port())
    try:
        deadline = time.time() + 300
        while time.time() < deadline and all(p.poll() is None for p in procs) and "train_loss" not in errs[0].read_text():
            time.sleep(0.05)
        assert all(p.poll() is None for p in procs), "a process ended before it could be preempted"
        procs[1].send_signal(signal.SIGTERM)  # the host of process 1 is being preempted
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    texts = [e.read_text() for e in errs]
    stops = [[ln for ln in t.splitlines() if ln.startswith("lbsgd:")] for t in texts]
    assert codes == [128 + signal.SIGTERM] * 2, (codes, [t[-1500:] for t in texts])
    assert all(len(s) == 1 and "stopped by SIGTERM after step" in s[0] for s in stops), stops
    steps = [int(s[-1].split("after step ")[1].split(";")[0]) for s in stops]
    assert steps[0] == steps[1] and 0 < steps[0] < 2 * (1437 // 32), stops
    assert checkpoint.steps(str(tmp_path))[-1] == steps[0]  # saved at the stop, off the 1000-step schedule
    rerun = _launch(  # the only run the launcher takes to a successful end: keep it through the launcher
        ["--num_processes=2", "--devices_per_process=4", "--", *TINY_ARGS, f"--workdir={tmp_path}",
         f"--config.data_dir={data_dir}", *extra]
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-2000:]
    assert f"resumed from checkpoint at step {steps[0]}" in rerun.stdout
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["steps"] == 2 * (1437 // 32)


def _pids_with(*needles):
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().decode(errors="replace")
            except OSError:
                continue
            if all(n in cmd for n in needles):
                found.append(int(pid))
    return found


def test_launcher_stops_a_still_running_peer_when_another_process_dies(tmp_path):
    """Process 1 dies before joining; process 0 would wait for it up to --init_timeout_s (120 s): the launcher
    stops it at once instead and names the failed process."""
    marker = f"--workdir={tmp_path}"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "lbsgd.launch", "--num_processes=2", "--devices_per_process=4", "--",
         *TINY_ARGS, marker],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (_pids_with(marker, "--process_id=1") and _pids_with(marker, "--process_id=0")):
            time.sleep(0.05)
        victims = _pids_with(marker, "--process_id=1")
        assert victims, "process 1 never started"
        t_kill = time.time()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        _, err = launcher.communicate(timeout=60)
        waited = time.time() - t_kill
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert "process 1 exited with status" in err and "stopping the others" in err, err[-2000:]
    assert waited < 30, f"the launcher took {waited:.0f} s to stop process 0"
    time.sleep(0.5)
    assert not _pids_with(marker, "--process_id=0"), "process 0 is still running"
