"""Checkpoints where the file system gets in the way: any legal directory name, a full disk, ``checkpoints``
that is a file, an over-long or unwritable workdir, ``~``, a mangled config.json. Each failure is one line
(``CheckpointError``/``ConfigError``, exit 2), within seconds, and never loses the last intact checkpoint."""

import errno
import os
import re
import shutil
import subprocess
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DIGITS, fork_runner, tiny_config
from conftest import TINY as TINY_FLAGS

from lbsgd import checkpoint
from lbsgd.config import validate
from lbsgd.errors import CheckpointError, ConfigError

TINY = [*TINY_FLAGS, "--config.num_epochs=1", "--config.checkpoint_every_steps=8"]


def _state(step):
    return {"w": jnp.arange(600.0) * step, "b": {"c": jnp.ones((20, 20)) * step}}


ABSTRACT = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))


def _restore(workdir):
    return checkpoint.restore_latest(checkpoint.manager(str(workdir)), str(workdir), ABSTRACT)


def _save_all(workdir, steps):
    mngr = checkpoint.manager(str(workdir))
    for s in steps:
        checkpoint.save(mngr, s, _state(s))
    mngr.wait_until_finished()
    return mngr


def _lbsgd_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("lbsgd:")]


def _orbax_waiting_threads():
    from orbax.checkpoint._src.futures import future

    return [t for t in threading.enumerate() if isinstance(t, future._SignalingThread) and t.is_alive()]


# ---------------------------------------------------------------------------------------------------
# Any legal directory name


NAMES = ["lr[0.1]", "]x[", "a*b", "a**b", "what?", "100%", "two words", "ünï✓日本", "[!x]*?%20 é"]


@pytest.mark.parametrize("name", NAMES)
def test_checkpoints_save_and_restore_under_any_directory_name(tmp_path, name, capfd):
    """orbax globs for its per-process OCDBT files below the checkpoint directory; with the directory's
    own name taken as a pattern (``[0.1]`` a character class, ``**`` refused) the save committed
    checkpoints without their root manifest, and every one of them then failed to restore."""
    workdir = str(tmp_path / name)
    validate.check_workdir(workdir)
    _save_all(workdir, (2, 4)).close()
    assert "No per-process OCDBT" not in capfd.readouterr().err
    state = _restore(workdir)  # a new manager: a resume
    np.testing.assert_array_equal(state["w"], np.arange(600.0) * 4)
    np.testing.assert_array_equal(checkpoint.load(workdir, 2)["b"]["c"], np.full((20, 20), 2.0))
    assert checkpoint.steps(workdir) == [2, 4] and not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))
    assert checkpoint.describe_latest(workdir) == f"step 4 in {os.path.join(workdir, 'checkpoints')}"


def test_a_run_in_a_bracketed_workdir_resumes(tmp_path, data_dir):
    """End to end: the second run resumes from the first run's checkpoint instead of declaring it damaged."""
    work = tmp_path / "lr[0.1]"
    args = [DIGITS, f"--workdir={work}", f"--config.data_dir={data_dir}", *TINY]
    first = fork_runner().run(*args, "--config.max_steps=16", timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    assert checkpoint.steps(str(work)) == [8, 16]
    second = fork_runner().run(*args, timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from checkpoint at step 16" in second.stderr and "damaged" not in second.stderr
    assert checkpoint.steps(str(work)) == [32, 40, 44] and not (work / "checkpoints_damaged").exists()


# ---------------------------------------------------------------------------------------------------
# A full disk


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size, path=None)``: a fresh tmpfs of ``size`` (e.g. '1m') mounted at ``path`` (made; a
    new directory in ``tmp_path`` by default), unmounted at the end; needs root."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, and mounting one needs root")
    mounted = []

    def mount(size, path=None):
        path = path or tmp_path / f"disk{len(mounted)}"
        path.mkdir(parents=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=False, capture_output=True
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def _fill(directory):
    """Write zeros to ``directory`` until its file system is full."""
    chunk = b"\0" * 65536
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    with pytest.raises(OSError), open(os.path.join(directory, "probe"), "wb") as f:
        f.write(b"\0" * 4096)
        f.flush()
        os.fsync(f.fileno())


def _no_library_noise(capfd, caplog):
    err = capfd.readouterr().err
    assert "Traceback" not in err and "RESOURCE_EXHAUSTED" not in err and "Event loop is closed" not in err, err
    loud = [r for r in caplog.records if r.levelno >= 30 and "orbax" in r.pathname and (r.exc_info or r.exc_text)]
    assert not loud, [r.getMessage() for r in loud]


def test_a_full_disk_fails_the_save_in_one_line_and_keeps_every_intact_checkpoint(small_disk, capfd, caplog):
    """The save of step 8 fails (in the background or not): one ``CheckpointError`` naming step 8 and the
    last good checkpoint, from that save or the next call; step 2, which a committed step 8 would have
    made orbax delete (``MAX_TO_KEEP`` = 3), is still there, and step 6 restores."""
    workdir = str(small_disk("1m") / "run")
    mngr = _save_all(workdir, (2, 4, 6))
    _fill(os.path.dirname(workdir))
    start = time.time()
    with pytest.raises(CheckpointError) as e:
        checkpoint.save(mngr, 8, _state(8))
        checkpoint.save(mngr, 10, _state(10))
        mngr.wait_until_finished()
    assert time.time() - start < 10
    directory = checkpoint.checkpoint_dir(workdir)
    assert str(e.value) == (
        f"cannot write checkpoint step 8 to {directory}: No space left on device; free space or use another "
        f"--workdir; the last good checkpoint is step 6"
    )
    assert checkpoint.steps(workdir) == [2, 4, 6] and sorted(os.listdir(directory)) == ["2", "4", "6"]
    np.testing.assert_array_equal(_restore(workdir)["w"], np.arange(600.0) * 6)
    assert not _orbax_waiting_threads()
    _no_library_noise(capfd, caplog)


def test_a_full_disk_with_no_earlier_checkpoint_says_so(small_disk, capfd, caplog):
    disk = small_disk("256k")
    workdir = str(disk / "run")
    os.makedirs(workdir)
    _fill(str(disk))
    with pytest.raises(CheckpointError) as e:
        checkpoint.record_config(workdir, tiny_config("unused"))
    assert (
        str(e.value)
        == f"cannot write {workdir}/config.json (No space left on device); free space or use another --workdir"
    )
    mngr = checkpoint.manager(workdir)
    with pytest.raises(CheckpointError) as e:
        checkpoint.save(mngr, 2, _state(2))
        mngr.wait_until_finished()
    assert str(e.value).startswith(f"cannot write checkpoint step 2 to {checkpoint.checkpoint_dir(workdir)}: No space")
    assert str(e.value).endswith("; free space or use another --workdir; there is no earlier checkpoint")
    assert checkpoint.steps(workdir) == [] and os.listdir(checkpoint.checkpoint_dir(workdir)) == []
    _no_library_noise(capfd, caplog)


def test_a_run_on_a_full_disk_exits_2_in_one_line_naming_the_last_good_checkpoint(small_disk, tmp_path, data_dir):
    """End to end: room for about two checkpoints of the tiny run (~100 KB each). Only checkpoints/ is on
    the small disk: the run's other files (TensorBoard events, histories) are the trainer's to report."""
    work = tmp_path / "run"
    small_disk("250k", work / "checkpoints")
    done = fork_runner().run(DIGITS, f"--workdir={work}", f"--config.data_dir={data_dir}", *TINY, timeout=120)
    lines = _lbsgd_lines(done.stderr)
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    found = re.fullmatch(
        r"lbsgd: error: cannot write checkpoint step (\d+) to (.*): No space left on device; free space or use "
        r"another --workdir; (the last good checkpoint is step (\d+)|there is no earlier checkpoint)",
        lines[0],
    )
    assert found and found.group(2) == str(work / "checkpoints"), lines[0]
    kept = checkpoint.steps(str(work))
    assert int(found.group(1)) not in kept and sorted(os.listdir(work / "checkpoints")) == sorted(map(str, kept))
    if found.group(4):
        assert kept[-1] == int(found.group(4))
        assert checkpoint.load(str(work))["step"] == kept[-1]  # intact


def test_a_refused_write_of_the_runs_other_files_is_recognised_for_one_line(tmp_path):
    """For ``lbsgd.main``: a full disk can fail TensorBoard's flush or a history append before a checkpoint."""
    import tensorflow as tf

    _save_all(tmp_path, (2,)).close()
    flush = tf.errors.ResourceExhaustedError(None, None, f"{tmp_path}/events.out; No space left on device\n\tFailed")
    cases = [
        (flush, errno.ENOSPC),
        (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
        (OSError(errno.EROFS, "ro"), errno.EROFS),
    ]
    for error, number in cases:
        message = str(checkpoint.write_failure(str(tmp_path), error))
        assert message.startswith(f"cannot write to {tmp_path}: {os.strerror(number)};"), message
    assert str(checkpoint.write_failure(str(tmp_path), flush)).endswith(
        "; free space or use another --workdir; the last good checkpoint is step 2"
    )
    assert checkpoint.write_failure(str(tmp_path), ValueError("a bug")) is None
    assert checkpoint.write_failure(str(tmp_path), OSError(errno.ENOENT, "No such file")) is None


# ---------------------------------------------------------------------------------------------------
# `checkpoints` that is a file


def test_checkpoints_that_is_a_file_is_refused_before_compiling(tmp_path, data_dir):
    (tmp_path / "checkpoints").write_text("not a directory")
    message = (
        f"{tmp_path}/checkpoints is a regular file, not a directory (checkpoints/ holds this run's checkpoints); "
        f"move it away or use another --workdir"
    )
    with pytest.raises(ConfigError) as e:
        validate.check_workdir(str(tmp_path))
    assert str(e.value) == message
    with pytest.raises(CheckpointError) as e:
        checkpoint.manager(str(tmp_path))
    assert str(e.value) == message
    start = time.time()
    done = fork_runner().run(DIGITS, f"--workdir={tmp_path}", f"--config.data_dir={data_dir}", *TINY, timeout=30)
    assert done.returncode == 2 and _lbsgd_lines(done.stderr) == [f"lbsgd: error: {message}"], done.stderr[-3000:]
    assert time.time() - start < 30
    os.remove(tmp_path / "checkpoints")
    os.symlink(tmp_path / "nowhere", tmp_path / "checkpoints_damaged")
    with pytest.raises(CheckpointError, match=r"checkpoints_damaged is a broken symbolic link, not a directory"):
        checkpoint.check_dir(str(tmp_path))


def test_a_save_into_checkpoints_turned_file_fails_at_once_and_leaves_no_waiting_thread(tmp_path, capfd, caplog):
    """orbax's save threads wait (non-daemon, 20 minutes) for a directory that could not be made: the
    process could not exit. The failure is one line and those threads are let go."""
    mngr = _save_all(tmp_path, (2,))
    directory = checkpoint.checkpoint_dir(str(tmp_path))
    shutil.rmtree(directory)
    open(directory, "w").close()
    start = time.time()
    with pytest.raises(CheckpointError) as e:
        checkpoint.save(mngr, 4, _state(4))
        mngr.wait_until_finished()
    assert str(e.value) == (
        f"cannot write checkpoint step 4 to {directory}: Not a directory; use another --workdir; there is no "
        f"earlier checkpoint"
    )
    deadline = time.time() + 5
    while _orbax_waiting_threads() and time.time() < deadline:
        time.sleep(0.05)
    assert not _orbax_waiting_threads() and time.time() - start < 10
    _no_library_noise(capfd, caplog)


# ---------------------------------------------------------------------------------------------------
# The workdir itself


def _nested(root, size):
    """A path below ``root`` of exactly ``size`` bytes (ASCII), of names of at most 202 bytes."""
    path = str(root)
    while size - len(path) > 203:
        path = os.path.join(path, "d" * 200)
    path = os.path.join(path, "e" * (size - len(path) - 1))
    assert len(path) == size
    return path


def test_an_over_long_workdir_is_refused_and_the_longest_accepted_one_holds_checkpoints(tmp_path):
    path_max = os.pathconf(str(tmp_path), "PC_PATH_MAX")
    longest = path_max - 1 - checkpoint.CHECKPOINT_PATH_RESERVE
    too_long = _nested(tmp_path / "a", longest + 1)
    with pytest.raises(ConfigError) as e:
        validate.check_workdir(too_long)
    msg = str(e.value)
    assert (
        "\n" not in msg
        and len(msg) < 400
        and f"is {longest + 1} bytes long" in msg
        and f"at most {longest} bytes" in msg
    )
    with pytest.raises(ConfigError, match="4029 bytes long"):
        validate.check_workdir(_nested(tmp_path / "b", 4029))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before creating anything
    with pytest.raises(ConfigError, match=r"has a 256-byte directory name .*at most 255 bytes per name"):
        validate.check_workdir(str(tmp_path / ("x" * 256) / "run"))
    with pytest.raises(ConfigError, match=r"has a 258-byte directory name"):
        validate.check_workdir(str(tmp_path / ("é" * 129)))  # bytes, not characters
    ok = validate.check_workdir(_nested(tmp_path / "c", longest))
    step = 10**10 - 1  # as many digits as the reserve allows
    mngr = checkpoint.manager(ok)
    checkpoint.save(mngr, step, _state(3))
    mngr.close()
    assert checkpoint.steps(ok) == [step] and int(checkpoint.load(ok)["w"][1]) == 3


def _read_only_dir(path):
    """``path`` made as a directory this process cannot write to: a read-only tmpfs (root ignores
    permissions) or mode 0o500; returns how the refusal reads, or skips."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        path.chmod(0o500)
        return "Permission denied"
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], check=False, capture_output=True
    )
    if done.returncode:
        pytest.skip(f"root ignores permissions and a read-only tmpfs cannot be mounted: {done.stderr!r}")
    return "Read-only file system"


def test_an_unwritable_workdir_or_checkpoints_dir_is_refused_in_one_line(tmp_path):
    mounts = [tmp_path / "ro", tmp_path / "w" / "checkpoints"]
    try:
        reason = _read_only_dir(mounts[0])
        with pytest.raises(ConfigError) as e:
            validate.check_workdir(str(mounts[0] / "run"))
        assert str(e.value) == f"--workdir={mounts[0]}/run is not writable ({reason}); choose another --workdir"
        reason = _read_only_dir(mounts[1])
        with pytest.raises(ConfigError) as e:
            validate.check_workdir(str(tmp_path / "w"))
        assert str(e.value) == (
            f"cannot write checkpoints to {mounts[1]} ({reason.lower()}); make it writable or use another --workdir"
        )
    finally:
        for path in mounts if os.geteuid() == 0 else ():
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def test_check_workdir_expands_the_home_directory_and_returns_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert validate.check_workdir("~/runs/x") == str(tmp_path / "home" / "runs" / "x")
    assert (tmp_path / "home" / "runs" / "x").is_dir() and not (tmp_path / "~").exists()
    assert validate.check_workdir("rel/y") == str(tmp_path / "rel" / "y")


# ---------------------------------------------------------------------------------------------------
# A mangled config.json


@pytest.mark.parametrize("text", ["[]", "null", "3", '"digits"'])
def test_a_config_json_that_is_not_an_object_is_one_line(tmp_path, text):
    _save_all(tmp_path, (2,)).close()
    (tmp_path / checkpoint.CONFIG_FILE).write_text(text)
    with pytest.raises(CheckpointError) as e:
        checkpoint.check_resume(str(tmp_path), tiny_config("unused"))
    assert str(e.value) == (
        f"{tmp_path}/config.json holds {text}, not a config (a JSON object of fields); restore it, or use a new "
        f"--workdir to start fresh"
    )
