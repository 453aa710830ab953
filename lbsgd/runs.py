"""Grids of ``lbsgd.main`` runs, shared by ``lbsgd.compare`` and ``lbsgd.sweep``.

One run = one ``python -m lbsgd.main`` subprocess in its own workdir. A run whose results.json exists
is done and never rerun; an interrupted one resumes from its checkpoint when started again. Errors come
back as ``RunFailed`` carrying the run's own one-line ``lbsgd: error: …`` message.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from typing import Sequence

from lbsgd.errors import EXIT_FAILED, EXIT_STOPPED, RunFailed, RunStopped


STOPPED = EXIT_STOPPED  # lbsgd.main's exit status after SIGINT / SIGTERM


def child_env(cpu_devices: int, compilation_cache: str = "") -> dict:
    """The environment for a run: ``cpu_devices`` simulated CPU devices unless XLA_FLAGS already says,
    and JAX's persistent compilation cache in ``compilation_cache`` (runs of the same shapes and
    schedule, e.g. other seeds, then skip compiling) unless the caller's environment sets one."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if cpu_devices and "xla_force_host_platform_device_count" not in flags:
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices}".strip()
    if compilation_cache and "JAX_COMPILATION_CACHE_DIR" not in env:
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(compilation_cache)
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    return env


def is_done(workdir: str) -> bool:
    """Whether the run in ``workdir`` finished (its results.json exists)."""
    return os.path.exists(os.path.join(workdir, "results.json"))


def launch_main(argv: Sequence[str], log_path: str, env: dict) -> tuple[int, str]:
    """Run ``python -m lbsgd.main <argv>`` to its end with ``env``, its standard output and then its standard
    error appended to ``log_path``; return its exit status and standard error (text). The one place a run's
    process starts."""
    with open(log_path, "a") as log:
        proc = subprocess.run([sys.executable, "-m", "lbsgd.main", *argv], stdout=log, stderr=subprocess.PIPE,
                              text=True, env=env)
        log.write(proc.stderr)
    return proc.returncode, proc.stderr


def run_main(config: str, workdir: str, overrides: Sequence[str], env: dict, name: str) -> dict:
    """Train ``config`` with ``--config.*`` ``overrides`` in ``workdir`` (or resume it) unless it is done;
    return its results.json. Output goes to ``workdir/log.txt`` (standard error after standard output).
    Raises ``RunFailed``, or ``RunStopped`` when the run was stopped by SIGINT or SIGTERM."""
    done = os.path.join(workdir, "results.json")
    if not os.path.exists(done):
        os.makedirs(workdir, exist_ok=True)
        log_path = os.path.join(workdir, "log.txt")
        code, stderr = launch_main([f"--config={config}", f"--workdir={workdir}", *overrides], log_path, env)
        if code in STOPPED:
            raise RunStopped(f"{name} was stopped")
        if code != 0:
            errors = [ln for ln in stderr.splitlines() if ln.startswith("lbsgd:")]
            tail = errors[-1] if errors else (stderr.strip().splitlines() or ["no output"])[-1]
            raise RunFailed(f"{name} failed ({tail}); log: {workdir}/log.txt")
    with open(done) as f:
        return json.load(f)


def history(workdir: str, name: str = "eval_history.jsonl") -> list[dict]:
    """A run's JSON-lines history in step order, the last line per step winning (a resumed run may
    repeat one): its evaluations (``eval_history.jsonl``) or per-epoch training metrics
    (``train_history.jsonl``)."""
    by_step = {}
    history = os.path.join(workdir, name)
    if os.path.exists(history):
        with open(history) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def load_config(path: str):
    """``get_config()`` of a config file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lbsgd_runs_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def write_csv(path: str, rows: list[dict]) -> None:
    """All rows, with the union of their fields as columns (written atomically)."""
    fields = []
    for row in rows:
        fields += [f for f in row if f not in fields]
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(path + ".tmp", path)


def stopped(prog: str, done: int, total: int) -> int:
    """After Ctrl-C or SIGTERM: one line saying how to resume, and exit status 130."""
    print(f"{prog}: stopped after {done} of {total} runs; rerun the same command to resume", file=sys.stderr)
    return EXIT_STOPPED[0]


def exit_status(prog: str, failures: list[str]) -> int:
    """0 if no run failed; else one line on stderr (how many failed, the first one's error) and 1."""
    if not failures:
        return 0
    print(f"{prog}: error: {len(failures)} run(s) failed; first: {failures[0]}", file=sys.stderr)
    return EXIT_FAILED


class Progress:
    """One line per finished run: ``[i/total] what: result (run time; elapsed, ETA)``.

    The ETA is the mean time of the runs trained so far in this invocation times the runs still to
    train (``pending`` = runs not done at the start; runs found done take no time)."""

    def __init__(self, total: int, pending: int | None = None):
        self.total, self.t0, self.trained, self.trained_s = total, time.time(), 0, 0.0
        self.pending = total if pending is None else pending

    def line(self, i: int, what: str, result: str, seconds: float, cached: bool) -> str:
        """The progress line for run ``i`` (1-based) that took ``seconds`` (``cached``: found done)."""
        if not cached:
            self.trained += 1
            self.trained_s += seconds
        elapsed = time.time() - self.t0
        per_run = self.trained_s / self.trained if self.trained else 0.0
        eta = per_run * max(0, self.pending - self.trained)
        took = "already done" if cached else f"{seconds:.0f} s"
        return f"[{i}/{self.total}] {what}: {result} ({took}; elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min)"

    @property
    def minutes(self) -> float:
        """Minutes since the start."""
        return (time.time() - self.t0) / 60
