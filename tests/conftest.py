"""Shared pytest setup.

XLA reads XLA_FLAGS once, when JAX initialises its backends, so the flag
asking for 8 simulated CPU devices must be set here, at conftest import time,
before any test module imports jax; the multi-worker tests (shard_map over
meshes of 1..8 devices) need them. setdefault keeps a caller's own flags.

JAX's persistent compilation cache is pointed at one temporary directory for the whole session
(and, through the environment, for every ``python -m lbsgd.main`` the tests start): the suite
compiles the same few programs many times (every rerun of a killed run, every reference run), and a
cached executable is the same machine code, so no result changes. In a multi-process run only
process 0 uses it (JAX writes from process 0 only, and other processes' cache keys differ).
"""

import atexit
import csv
import json
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # as lbsgd.main sets it: same preprocessing bits
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="lbsgd-test-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data dir with the digits builder prepared once for the whole session."""
    path = str(tmp_path_factory.mktemp("tfds"))
    from lbsgd.data import digits

    digits.builder(path)
    return path


def tiny_config(data_dir, **overrides):
    """The digits config shrunk to a few fast steps (resnet4, width 8)."""
    sys.path.insert(0, REPO)
    from experiments import digits as digits_cfg

    c = digits_cfg.get_config()
    c.data_dir = data_dir
    c.model, c.model_width = "resnet4", 8
    c.per_worker_batch_size = 4
    c.num_epochs = 1
    c.log_every_steps = 2
    c.eval_every_epochs = 0
    c.checkpoint_every_steps = 2
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def tiny_bn_net():
    """Conv -> BatchNorm -> ReLU -> pool -> Dense: the smallest net where per-worker BN statistics matter."""
    import flax.linen as nn
    import jax.numpy as jnp

    class TinyBNNet(nn.Module):
        @nn.compact
        def __call__(self, x, train=True):
            x = nn.Conv(6, (3, 3), use_bias=False)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
            return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))

    return TinyBNNet()


def run_module(module, *args, env=None, timeout=300):
    """Run ``python -m <module> <args>`` from the repo root in a subprocess; returns CompletedProcess (text)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


_FORK_RUNNER = []


def fork_runner():
    """This test process's ``forkrun`` server (started on first use, stopped at the end of the session):
    ``lbsgd.main`` runs forked from a process that has imported the libraries, ~0.1 s to start each."""
    if _FORK_RUNNER and _FORK_RUNNER[0].dead():  # stopped by a run's timeout: start another
        _FORK_RUNNER.pop().close()
    if not _FORK_RUNNER:
        import forkrun

        _FORK_RUNNER.append(forkrun.ForkRunner())
    return _FORK_RUNNER[0]


@pytest.fixture(scope="session", autouse=True)
def _stop_fork_runner():
    yield
    while _FORK_RUNNER:
        _FORK_RUNNER.pop().close()


def forked_launch(argv, log_path, env):
    """``lbsgd.runs.launch_main`` through this test process's ``forkrun`` server (the same exit status,
    standard output and error appended to ``log_path``, standard error returned), for ``lbsgd.sweep`` and
    ``lbsgd.compare`` tests: their runs' ``lbsgd.main`` then skips Python's and the libraries' start-up.
    Of ``env`` only ``XLA_FLAGS`` (the runs' device count) reaches the run; the rest is the server's."""
    run = fork_runner().start(*argv, env={"XLA_FLAGS": env.get("XLA_FLAGS", "")})
    run.wait(300)
    done = run.completed()
    with open(log_path, "a") as log:
        log.write(done.stdout + done.stderr)
    return done.returncode, done.stderr


def main_here(module, args, capsys):
    """``python -m <module> <args>`` run in this test process by calling ``module.main(args)`` (for
    ``lbsgd.sweep`` and ``lbsgd.compare``: their runs are still ``lbsgd.main`` subprocesses); returns a
    ``CompletedProcess`` with the captured output."""
    code = module.main(args)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([module.__name__, *args], code, out, err)


def run_main(*args, env=None, timeout=300):
    """Run ``python -m lbsgd.main <args>`` in a subprocess."""
    return run_module("lbsgd.main", *args, env=env, timeout=timeout)


# The modules that take longest (measured in full runs), first: the two test processes (setup.cfg: --dist
# loadscope) take whole modules in this order, so the short ones fill in at the end instead of one long module
# running alone; with setup.cfg's --no-loadscope-reorder (xdist's own order is by number of tests).
SLOW_FIRST = ("test_multiprocess.py", "test_main.py", "test_accuracy.py", "test_strategies.py", "test_imagenet.py",
              "test_train.py", "test_notebooks.py", "test_easgd_async.py", "test_aggregators.py", "test_checkpoint.py",
              "test_local_sgd.py", "test_bn_groups.py", "test_models.py", "test_noise_scale.py", "test_folder.py",
              "test_sweep.py")


def pytest_collection_modifyitems(items):
    """Order the modules slowest first (``SLOW_FIRST``), the rest after them as collected."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(SLOW_FIRST)))


def file_stamps(workdir):
    """Modification times of every file under ``workdir`` (a ``pathlib.Path``)."""
    return {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}


@pytest.fixture
def no_launch(monkeypatch):
    """lbsgd.main must not start (sweep/compare tests): every launch is recorded, and fails."""
    from lbsgd import runs

    calls = []

    def launch(argv, log_path, env):
        calls.append(argv)
        return 1, "lbsgd: error: this test starts no run"

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(runs, "launch_main", launch)
    return calls


# The digits config and the flags of a tiny, fast lbsgd.main run (ResNet-4 of width 8, n = 4).
DIGITS = "--config=experiments/digits.py"
TINY = [
    "--config.model=resnet4",
    "--config.model_width=8",
    "--config.per_worker_batch_size=4",
    "--config.log_every_steps=4",
    "--config.eval_every_epochs=0",
]


def read_json(path):
    """The JSON value in ``path``."""
    with open(path) as f:
        return json.load(f)


def read_csv(path):
    """The rows of the CSV file ``path`` as dicts."""
    with open(path) as f:
        return list(csv.DictReader(f))
