"""The main job as a user runs it: bad input, an end-to-end run, and resume after a crash."""

import glob
import json
import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from conftest import DIGITS, TINY, fork_runner
from lbsgd import checkpoint

ABSL_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")  # an absl log line (progress), not an error message


# name: (arguments, a phrase the one error line must contain). {placeholders} are files made by bad_runs.
BAD_INPUTS = {
    # Layout and sizes
    "workers_not_multiple_of_devices": (["--config.num_workers=6"], "config.num_workers=6"),
    "fewer_workers_than_devices": (["--config.num_workers=4"], "config.num_workers=4"),
    "more_devices_than_exist": (["--config.num_workers=16", "--config.num_devices=16"], "num_devices"),
    "accumulation_not_dividing_workers": (["--config.accumulation_steps=3"], "config.accumulation_steps=3"),
    "per_worker_batch_zero": (["--config.per_worker_batch_size=0"], "config.per_worker_batch_size"),
    "global_batch_larger_than_dataset": (["--config.per_worker_batch_size=200"], "larger than the 1437"),
    "absurd_worker_count": (["--config.num_workers=800000000"], "larger than the 1437"),
    "zero_eval_batch": (["--config.eval_batch_size=0"], "config.eval_batch_size"),
    "zero_log_interval": (["--config.log_every_steps=0"], "config.log_every_steps"),
    "zero_checkpoint_interval": (["--config.checkpoint_every_steps=0"], "config.checkpoint_every_steps"),
    # Names
    "unknown_dataset": (["--config.dataset=mnist"], "config.dataset"),
    "unknown_tfds_dataset": (["--config.dataset=tfds:no_such_dataset_xyz"], "unknown TFDS dataset"),
    "unknown_strategy": (["--config.strategy=carrier_pigeon"], "config.strategy"),
    "unknown_warmup": (["--config.warmup=linear"], "config.warmup"),
    "unknown_model": (["--config.model=resnet9"], "config.model"),
    "unknown_optimizer": (["--config.optimizer=adam"], "config.optimizer"),
    "unknown_dtype": (["--config.dtype=float64"], "config.dtype"),
    "float16_without_loss_scaling": (["--config.dtype=float16"], "loss scaling"),
    "unknown_aggregation": (["--config.aggregation=tree"], "config.aggregation"),
    "unknown_nonfinite_policy": (["--config.on_nonfinite=ignore"], "config.on_nonfinite"),
    "unknown_lars_trust_ratio": (["--config.lars_trust_ratio=mine"], "config.lars_trust_ratio"),
    "unknown_topology": (["--config.strategy=dpsgd", "--config.topology=torus"], "config.topology='torus'"),
    "topology_needs_more_workers": (
        ["--config.strategy=dpsgd", "--config.num_workers=2", "--config.topology=ring"],
        "needs at least 3 workers",
    ),
    "option_of_another_strategy": (["--config.dpsgd.form=atc"], "config.dpsgd.form is an option of strategy dpsgd"),
    "aggregation_for_decentralized": (["--config.strategy=gossip_pull", "--config.aggregation=ring"], "allreduce"),
    "easgd_beta_out_of_range": (["--config.strategy=easgd", "--config.easgd.beta=2.0"], "config.easgd.beta"),
    "negative_staleness": (["--config.strategy=async_ps", "--config.async_ps.staleness=-1"], "staleness"),
    "unknown_lr_scaling": (["--config.lr_scaling=cubic"], "config.lr_scaling"),
    "saturating_without_noise_scale": (["--config.lr_scaling=saturating"], "needs the gradient noise scale"),
    "noise_scale_from_missing_run": (
        ["--config.lr_scaling=saturating", "--config.b_noise_from={missing}"],
        "cannot read a results.json",
    ),
    "noise_scale_from_run_without_it": (
        ["--config.lr_scaling=saturating", "--config.b_noise_from={no_noise}"],
        "no positive noise_scale_run",
    ),
    "noise_scale_with_decentralized_strategy": (["--config.strategy=dpsgd", "--config.noise_scale=True"], "allreduce"),
    "noise_scale_with_one_worker": (["--config.num_workers=1", "--config.noise_scale=True"], "2 or more"),
    # Numbers
    "zero_learning_rate": (["--config.base_learning_rate=0.0"], "config.base_learning_rate"),
    "negative_learning_rate": (["--config.base_learning_rate=-0.1"], "config.base_learning_rate"),
    "nan_learning_rate": (["--config.base_learning_rate=nan"], "config.base_learning_rate"),
    "infinite_learning_rate": (["--config.base_learning_rate=inf"], "config.base_learning_rate"),
    "momentum_above_one": (["--config.momentum=1.5"], "config.momentum"),
    "negative_weight_decay": (["--config.weight_decay=-0.0001"], "config.weight_decay"),
    "label_smoothing_one": (["--config.label_smoothing=1.0"], "config.label_smoothing"),
    "negative_warmup": (["--config.warmup_epochs=-1"], "config.warmup_epochs"),
    "zero_epochs": (["--config.num_epochs=0"], "config.num_epochs"),
    "zero_max_consecutive_nonfinite": (["--config.max_consecutive_nonfinite=0"], "max_consecutive_nonfinite"),
    # Types and fields
    "word_for_an_integer": (["--config.num_workers=eight"], "--config.num_workers=eight"),
    "fraction_for_an_integer": (["--config.num_workers=8.5"], "num_workers"),
    "unknown_override": (["--config.num_wrokers=8"], "num_wrokers"),
    "zero_heartbeat_timeout": (["--heartbeat_timeout_s=0"], "--heartbeat_timeout_s=0"),
    "negative_process_id": (["--process_id=-1"], "--process_id=-1"),
    # Files
    "missing_config_file": (["--config=experiments/no_such_file.py"], "no_such_file.py"),
    "missing_config_file_space_form": (["--config", "experiments/no_such_file.py"], "'experiments/no_such_file.py'"),
    "config_file_with_syntax_error": (["--config={syntax}"], "syntax_error.py"),
    "config_file_without_get_config": (["--config={no_get_config}"], "get_config"),
    "unwritable_workdir": (["--workdir={file}/sub"], "--workdir"),
    "missing_data_folder": (["--config.dataset=folder:{missing}"], "does not exist"),
    "empty_data_folder": (["--config.dataset=folder:{empty}"], "has no 'train' sub-folder"),
    "folder_without_images": (["--config.dataset=folder:{no_images}"], "has no .jpg/.jpeg/.png images"),
    "corrupt_image_in_data_folder": (
        ["--config.dataset=folder:{corrupt}", "--config.image_size=16", "--config.per_worker_batch_size=1", *TINY[:2]],
        "bad.jpg of folder:",
    ),
}


def _make_bad_files(tmp):
    """The files the {placeholders} of BAD_INPUTS name."""
    import numpy as np
    import tensorflow as tf

    (tmp / "a_file").write_text("not a directory")
    (tmp / "syntax_error.py").write_text("def get_config(:\n    pass\n")
    (tmp / "no_get_config.py").write_text("x = 1\n")
    (tmp / "empty").mkdir()
    (tmp / "no_images" / "train" / "a").mkdir(parents=True)
    (tmp / "no_images" / "val" / "a").mkdir(parents=True)
    corrupt = tmp / "corrupt"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (corrupt / split / c).mkdir(parents=True)
            for i in range(4):  # 8 train images = one global batch of k=8 x n=1: the bad one is in step 1
                img = np.random.default_rng(i).integers(0, 255, (16, 16, 3)).astype(np.uint8)
                (corrupt / split / c / f"{i}.jpg").write_bytes(tf.io.encode_jpeg(img).numpy())
    (corrupt / "train" / "b" / "bad.jpg").write_bytes(b"not a jpeg at all")
    (corrupt / "train" / "b" / "3.jpg").unlink()
    (tmp / "no_noise").mkdir()
    (tmp / "no_noise" / "results.json").write_text('{"eval_accuracy": 0.99, "noise_scale_run": null}')
    return {
        "file": tmp / "a_file",
        "syntax": tmp / "syntax_error.py",
        "no_get_config": tmp / "no_get_config.py",
        "missing": tmp / "no_such_folder",
        "empty": tmp / "empty",
        "no_images": tmp / "no_images",
        "corrupt": corrupt,
        "no_noise": tmp / "no_noise",
    }


def run_forked(*args):
    """``lbsgd.main`` with ``args``, run through ``lbsgd.main.run()`` (the console script's entry) in a fresh
    process forked from one that has imported the libraries (``forkrun``: ~0.1 s to start instead of ~5 s)."""
    return fork_runner().run(*args)


def start_forked(*args, stderr=None):
    """``run_forked`` without waiting: a handle to signal, ``poll`` and ``wait`` (``subprocess.Popen``'s)."""
    return fork_runner().start(*args, stderr=stderr)


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, data_dir):
    """Run every bad input once (``run_forked``)."""
    tmp = tmp_path_factory.mktemp("bad")
    files = _make_bad_files(tmp)

    def one(name):
        extra, _ = BAD_INPUTS[name]
        extra = [a.format(**files) for a in extra]
        args = [DIGITS, f"--workdir={tmp / name}", f"--config.data_dir={data_dir}"]
        args = [
            a
            for a in args
            if not (a.startswith("--config=") and any(e == "--config" or e.startswith("--config=") for e in extra))
        ]
        args = [a for a in args if not (a.startswith("--workdir") and any(e.startswith("--workdir") for e in extra))]
        return name, run_forked(*args, *extra)

    return dict(map(one, BAD_INPUTS))


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(bad_runs, name):
    proc = bad_runs[name]
    _, expected = BAD_INPUTS[name]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ABSL_LOG.match(ln)]  # progress logs aside
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lbsgd: error: ") and expected in lines[0], lines[0]


def _read(path):
    with open(path) as f:
        return json.load(f)


STRATEGY_ARGS = {  # strategies whose own state must survive a crash: push-sum weights; stale copies and delays
    # The allreduce run on ResNet-8: its reference run must learn in one epoch, and resnet4, which pools its one
    # stride-1 stage globally, stays near chance (15 % after one epoch; ResNet-8 33 %).
    "allreduce": ["--config.model=resnet8"],
    "gossip_push": ["--config.strategy=gossip_push"],
    "async_ps": ["--config.strategy=async_ps", "--config.async_ps.staleness=3", "--config.async_ps.delay=random"],
}


def _short_args(workdir, data_dir, strategy="allreduce"):
    """`lbsgd.main` arguments of a short run: 1 epoch of k=8 x n=4 = 44 steps, checkpoints every 8."""
    return [
        DIGITS,
        f"--workdir={workdir}",
        f"--config.data_dir={data_dir}",
        *TINY,
        *STRATEGY_ARGS[strategy],
        "--config.num_epochs=1",
        "--config.checkpoint_every_steps=8",
    ]


def _short_run(workdir, data_dir, strategy="allreduce"):
    """The short run, to the end."""
    return run_forked(*_short_args(workdir, data_dir, strategy))


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
    assert results["steps"] == 1437 // 32 and results["epochs"] == 1.0
    assert results["global_batch_size"] == 32 and results["num_workers"] == 8 and results["devices"] == 8
    assert results["eval_examples"] == 360
    assert results["strategy"] == "allreduce" and results["aggregation"] == "psum"
    assert results["consensus_distance"] == 0.0  # one shared copy
    assert results["bytes_sent_per_worker_per_step"] == 2 * 7 / 8 * 4 * results["num_params"]  # ring allreduce
    assert 0.3 < results["eval_accuracy"] <= 1.0  # one tiny epoch already learns something (chance is 0.1)
    events = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
    assert len(events) == 1
    import tensorflow as tf

    last = {}  # the process leaves without interpreter teardown: the final scalars must be on disk already
    for event in tf.compat.v1.train.summary_iterator(str(workdir / events[0])):
        for value in event.summary.value:
            last[value.tag] = (event.step, tf.make_ndarray(value.tensor) if value.HasField("tensor") else value.simple_value)
    assert last["eval_accuracy"][0] == last["train_loss"][0] == results["steps"]
    assert float(last["eval_accuracy"][1]) == pytest.approx(results["eval_accuracy"], rel=1e-6)
    kept = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert kept[-1] == results["steps"] and len(kept) == 3  # keep the last 3


@pytest.mark.parametrize("strategy", sorted(set(STRATEGY_ARGS) - {"allreduce"}))  # allreduce: fault injection below
def test_killed_run_resumes_to_the_same_result(reference_runs, tmp_path, data_dir, strategy):
    _, want = reference_runs(strategy)
    proc = start_forked(*_short_args(tmp_path, data_dir, strategy))
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
        "--config.num_epochs=2",
        "--config.checkpoint_every_steps=1000",
        "--config.log_every_steps=2",
    ]
    err_path = tmp_path / "stderr.txt"
    err_path.write_text("")
    proc = start_forked(*args, stderr=str(err_path))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and "train_loss" not in err_path.read_text():
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    last = [ln for ln in err_path.read_text().splitlines() if ln.startswith("lbsgd:")][-1]
    assert "stopped by SIGTERM after step" in last and "rerun the same command" in last, last
    step = int(last.split("after step ")[1].split(";")[0])
    assert 0 < step < 2 * (1437 // 32)
    assert (tmp_path / "checkpoints" / str(step)).is_dir()  # saved at the stop, not only every 1000 steps
    rerun = run_forked(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from checkpoint at step {step}" in rerun.stderr
    assert _read(tmp_path / "results.json")["steps"] == 2 * (1437 // 32)


# --------------------------------------------------------------------------- trust (issue #13)


def _copy_run(reference_run, tmp_path):
    """A copy of the finished reference workdir, without its results.json."""
    src, want = reference_run
    work = tmp_path / "run"
    shutil.copytree(src, work)
    (work / "results.json").unlink()
    return work, want


def _truncate_checkpoint(workdir, step):
    """Cut every data file of the checkpoint in half (a file may be an unreferenced older b-tree node, so
    cutting only one can leave the checkpoint readable)."""
    files = glob.glob(str(workdir / "checkpoints" / str(step) / "default" / "**" / "d" / "*"), recursive=True)
    assert files
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def _lbsgd_lines(stderr):
    return [ln for ln in stderr.splitlines() if ln.startswith("lbsgd:")]


def test_damaged_latest_checkpoint_falls_back_and_reaches_the_same_result(reference_run, tmp_path, data_dir):
    work, want = _copy_run(reference_run, tmp_path)
    kept = checkpoint.steps(str(work))
    _truncate_checkpoint(work, kept[-1])
    rerun = _short_run(work, data_dir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    warnings = [ln for ln in rerun.stderr.splitlines() if "damaged and moved" in ln]
    assert len(warnings) == 1 and f"checkpoint step {kept[-1]} (" in warnings[0], warnings
    assert ") is damaged" in warnings[0] and f"step {kept[-2]} (" not in warnings[0], warnings
    assert f"resuming from step {kept[-2]}" in warnings[0] and "Traceback" not in rerun.stderr
    got = _read(work / "results.json")
    for field in ("eval_accuracy", "eval_loss", "train_loss", "steps"):  # retrained from the older one: same run
        assert got[field] == pytest.approx(want[field], rel=1e-6, abs=1e-7), field
    assert (work / "checkpoints_damaged" / str(kept[-1])).is_dir()


def test_rerun_of_a_finished_run_keeps_its_training_figures(reference_run, tmp_path, data_dir):
    """The same command again on a finished run trains no step: results.json keeps the last step's training
    loss (and the strategy's training figures) of the run that ended there; without a results.json to take
    them from, train_loss is null, never NaN."""
    work, want = _copy_run(reference_run, tmp_path)
    shutil.copy(reference_run[0] / "results.json", work / "results.json")
    again = _short_run(work, data_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    got = _read(work / "results.json")
    assert got["steps"] == want["steps"] and got["train_loss"] == want["train_loss"]
    assert got["eval_accuracy"] == pytest.approx(want["eval_accuracy"], rel=1e-6)
    (work / "results.json").unlink()
    again = _short_run(work, data_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    text = (work / "results.json").read_text()
    assert "NaN" not in text and json.loads(text)["train_loss"] is None


def test_no_intact_checkpoint_is_one_line_and_exit_2(reference_run, tmp_path, data_dir):
    work, _ = _copy_run(reference_run, tmp_path)
    for step in checkpoint.steps(str(work)):
        _truncate_checkpoint(work, step)
    rerun = _short_run(work, data_dir)
    lines = [ln for ln in rerun.stderr.splitlines() if ln.strip() and not ABSL_LOG.match(ln)]
    assert rerun.returncode == 2 and len(lines) == 1, rerun.stderr[-3000:]
    assert lines[0].startswith("lbsgd: error: no intact checkpoint") and "new --workdir" in lines[0]


def test_incompatible_resume_is_refused_before_compiling_and_allowed_changes_are_logged(reference_run, tmp_path, data_dir):
    work, want = _copy_run(reference_run, tmp_path)
    t0 = time.time()
    refused = _short_run_with(work, data_dir, "--config.num_workers=16", "--config.model=resnet20")
    lines = [ln for ln in refused.stderr.splitlines() if ln.strip()]
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-3000:]
    assert "num_workers 8 -> 16" in lines[0] and "model 'resnet8' -> 'resnet20'" in lines[0], lines[0]
    print(f"refused in {time.time() - t0:.1f} s")
    allowed = _short_run_with(work, data_dir, "--config.log_every_steps=8", "--config.eval_every_epochs=1")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "resuming with changed config fields: eval_every_epochs 0 -> 1, log_every_steps 4 -> 8" in allowed.stderr
    assert _read(work / "results.json")["eval_accuracy"] == pytest.approx(want["eval_accuracy"], rel=1e-6)


def _short_run_with(workdir, data_dir, *extra):
    """The short run with extra overrides (later flags win)."""
    return run_forked(*_short_args(workdir, data_dir), *extra)


def test_nonfinite_loss_stops_with_exit_3_and_is_never_saved(tmp_path, data_dir):
    proc = _short_run_with(tmp_path, data_dir, "--config.base_learning_rate=10000", "--config.checkpoint_every_steps=2")
    lines = _lbsgd_lines(proc.stderr)
    assert proc.returncode == 3 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("lbsgd: error: non-finite loss or gradient at step "), lines[0]
    bad = int(lines[0].split("at step ")[1].split()[0])
    saved = checkpoint.steps(str(tmp_path))
    assert saved and max(saved) < bad, (saved, bad)
    assert f"last good checkpoint: step {max(saved)} in" in lines[0] and "on_nonfinite=skip" in lines[0]
    for step in saved:  # every state on disk is finite
        leaves = jax.tree.leaves(checkpoint.load(str(tmp_path), step)["params"])
        assert all(np.all(np.isfinite(x)) for x in leaves), step
    assert not (tmp_path / "results.json").exists()


def test_skip_nonfinite_stops_after_max_consecutive_skips(tmp_path, data_dir):
    proc = _short_run_with(
        tmp_path,
        data_dir,
        "--config.base_learning_rate=10000",
        "--config.on_nonfinite=skip",
        "--config.max_consecutive_nonfinite=3",
        "--config.log_every_steps=1",
    )
    lines = _lbsgd_lines(proc.stderr)
    assert proc.returncode == 3 and len(lines) == 1, proc.stderr[-3000:]
    assert "3 consecutive steps skipped" in lines[0], lines[0]
    assert proc.stderr.count("update skipped") == 3  # each skipped step said so as it happened
    for step in checkpoint.steps(str(tmp_path)):  # skipped updates kept the last finite state
        leaves = jax.tree.leaves(checkpoint.load(str(tmp_path), step)["params"])
        assert all(np.all(np.isfinite(x)) for x in leaves), step


def _kill_when(proc, ready, timeout=240):
    """SIGKILL ``proc`` as soon as ``ready()`` holds; False if the run ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    return False


def test_sigkill_at_random_moments_and_mid_save_then_resume_gives_the_same_result(reference_run, tmp_path, data_dir):
    """Fault injection: kill -9 while a checkpoint is being written, then at seeded random moments; after each
    kill the same command resumes; the finished run equals the uninterrupted one."""
    _, want = reference_run
    rng = np.random.default_rng(13)
    ckpts = tmp_path / "checkpoints"
    args = _short_args(tmp_path, data_dir)

    def saving():  # orbax writes <step>.orbax-checkpoint-tmp* and renames it when complete
        return ckpts.exists() and any("tmp" in d for d in os.listdir(ckpts))

    def after(seconds):
        start, before = [], []

        def ready():
            if not before:
                before.append(max(checkpoint.steps(str(tmp_path)), default=0))
            if not start and max(checkpoint.steps(str(tmp_path)), default=0) > before[0]:
                start.append(time.time())  # this run is training (it committed a checkpoint of its own)
            finished = (tmp_path / "results.json").exists()  # the run wrote its results: let it end
            return bool(start) and time.time() - start[0] >= seconds and not finished

        return ready

    plans = [("mid-save", saving)] + [(f"random {t:.2f} s", after(t)) for t in rng.uniform(0.0, 1.5, size=2)]
    killed = []
    for name, ready in plans:
        proc = start_forked(*args)
        if _kill_when(proc, ready):
            killed.append((name, checkpoint.steps(str(tmp_path))))
    print("killed:", killed)
    assert killed and killed[0][0] == "mid-save", killed
    assert not (tmp_path / "results.json").exists() or len(killed) < len(plans)
    final = _short_run(tmp_path, data_dir)
    assert final.returncode == 0, final.stderr[-3000:]
    got = _read(tmp_path / "results.json")
    for field in ("eval_accuracy", "eval_loss", "train_loss", "steps", "epochs"):
        assert got[field] == pytest.approx(want[field], rel=1e-6, abs=1e-7), field


# ---------------------------------------------------------------------------- one run per workdir, stops, environment


def _wait_for_lock(workdir, proc, timeout=120):
    """Until ``proc`` holds the workdir's lock (its record is in the lock file)."""
    lock = workdir / ".lbsgd.lock"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if lock.exists() and lock.read_text().strip():
            return json.loads(lock.read_text())
        time.sleep(0.02)
    raise AssertionError("the first run never took the lock")


def test_a_second_run_on_a_busy_workdir_is_refused_and_the_first_is_unchanged(reference_run, tmp_path, data_dir):
    _, want = reference_run
    first = start_forked(*_short_args(tmp_path, data_dir))
    holder = _wait_for_lock(tmp_path, first)
    second = run_forked(*_short_args(tmp_path, data_dir))
    lines = [ln for ln in second.stderr.splitlines() if ln.strip() and not ABSL_LOG.match(ln)]
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert f"is in use by another lbsgd run (pid {holder['pid']} on host" in lines[0], lines[0]
    assert first.wait(240) == 0
    got = _read(tmp_path / "results.json")
    for field in ("eval_accuracy", "eval_loss", "train_loss", "steps"):
        assert got[field] == want[field], field  # bitwise the lone run's numbers
    assert (tmp_path / ".lbsgd.lock").read_text() == ""  # released at a clean end


def test_resuming_with_fewer_steps_than_done_is_refused(reference_run, tmp_path, data_dir):
    workdir, results = reference_run
    shutil.copytree(workdir, tmp_path / "run")
    proc = run_forked(*_short_args(tmp_path / "run", data_dir), "--config.max_steps=8")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ABSL_LOG.match(ln)]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"holds a run at step {results['steps']}, past the 8 steps this config trains" in lines[0], lines[0]


@pytest.mark.parametrize("delay_s, sig", [(0.2, signal.SIGINT), (1.0, signal.SIGINT), (2.0, signal.SIGINT), (1.0, signal.SIGTERM)])
def test_a_signal_before_the_first_step_is_one_line_and_the_loops_exit_status(tmp_path, data_dir, delay_s, sig):
    """Ctrl-C or SIGTERM while loading, validating or compiling: the run ends at once with one line and the
    status a stop during training has (130 / 143); nothing is half-written and the workdir is free again."""
    args = [DIGITS, f"--workdir={tmp_path}", f"--config.data_dir={data_dir}", "--config.model=resnet20"]
    proc = start_forked(*args)  # ResNet-20: seconds of compilation before the first step
    time.sleep(delay_s)
    proc.send_signal(sig)
    assert proc.wait(60) == 128 + sig
    err = proc.completed().stderr
    lines = [ln for ln in err.splitlines() if ln.strip() and not ABSL_LOG.match(ln)]
    assert "Traceback" not in err and len(lines) == 1, err
    name = signal.Signals(sig).name
    assert lines[0] == f"lbsgd: stopped by {name} before the first step; rerun the same command to start or resume"
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")
    assert not (tmp_path / ".lbsgd.lock").exists() or (tmp_path / ".lbsgd.lock").read_text() == ""


def test_no_devices_is_one_line(tmp_path, data_dir):
    proc = fork_runner().run(
        DIGITS, f"--workdir={tmp_path}", f"--config.data_dir={data_dir}",
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=0"},
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "lbsgd: error: XLA_FLAGS asks for --xla_force_host_platform_device_count=0" in proc.stderr


def test_an_accelerator_that_is_not_there_is_one_line(tmp_path):
    """JAX_PLATFORMS is read when JAX is imported: a real process (no forked one)."""
    from conftest import run_main

    proc = run_main(DIGITS, f"--workdir={tmp_path}", env={"JAX_PLATFORMS": "tpu"}, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ABSL_LOG.match(ln)]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("lbsgd: error: JAX_PLATFORMS='tpu' asks for a backend this machine cannot start")


def test_backend_messages_name_the_setting(monkeypatch):
    """check_backend's three messages, from JAX's own errors (no process needed)."""
    from lbsgd import errors, main

    def fail(error):
        def devices():
            raise error

        return devices

    cases = [
        ({"JAX_PLATFORMS": "cuda"}, AssertionError(), "JAX_PLATFORMS='cuda' asks for a backend this machine cannot start (no such device here)"),
        ({"JAX_PLATFORMS": "gpu"}, RuntimeError("Unable to initialize backend 'rocm': not known (set JAX_PLATFORMS='' to x)"), "(Unable to initialize backend 'rocm': not known)"),
        ({"JAX_PLATFORMS": ""}, RuntimeError("broken plugin"), "JAX cannot start a backend (broken plugin)"),
    ]  # fmt: skip
    for env, error, message in cases:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(jax, "devices", fail(error))
        with pytest.raises(errors.ConfigError) as e:
            main.check_backend()
        assert message in str(e.value) and "\n" not in str(e.value)


def test_workdir_with_a_tilde_is_under_home(tmp_path, data_dir):
    from conftest import REPO

    proc = fork_runner().run(
        DIGITS, "--workdir=~/x", f"--config.data_dir={data_dir}", *TINY, "--config.max_steps=1",
        env={"HOME": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "x" / "results.json").exists() and not os.path.exists(os.path.join(REPO, "~"))


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--heartbeat_timeout_s=0", "argument --heartbeat_timeout_s: must be > 0, got 0"),
        ("--port=99999", "argument --port: must be a port number from 0 to 65535, got 99999"),
        ("--num_processes=0", "argument --num_processes: must be > 0, got 0"),
        ("--devices_per_process=-2", "argument --devices_per_process: must be > 0, got -2"),
    ],
)
def test_launcher_flags_are_checked_in_one_line(capsys, flag, message):
    from lbsgd import launch

    with pytest.raises(SystemExit) as e:
        launch.main([flag, "--", DIGITS, "--workdir=/nonexistent/never/used"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"python -m lbsgd.launch: error: {message}\n"
