"""Grids of ``lbsgd.main`` runs, shared by ``lbsgd.compare`` and ``lbsgd.sweep``.

One run = one ``python -m lbsgd.main`` subprocess in its own workdir. A run is identified by its full
resolved config (``resolve_config``: the config file and exactly the ``--config.*`` overrides the run gets,
parsed as ``lbsgd.main`` parses them, ``b_noise_from`` resolved), which ``lbsgd.main`` records in
``WORKDIR/config.json``. Before anything starts, ``check_planned`` compares every planned run with what its
workdir holds: a workdir that holds a run (config.json, checkpoints or results.json) of another config, or
one that cannot be checked (no config.json), is refused in one line (``StaleRun``); so a finished run is
reused only when its recorded config is exactly the asked one, and an interrupted one of the same config
resumes from its checkpoint when started again. Errors come back as ``RunFailed`` carrying the run's own
one-line ``lbsgd: error: …`` message.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Sequence

from lbsgd import cli
from lbsgd.errors import EXIT_FAILED, EXIT_STOPPED, ConfigError, LbsgdError, RunFailed, RunStopped, StaleRun


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


CONFIG_FILE = "config.json"  # lbsgd.checkpoint.CONFIG_FILE: the config a run records in its workdir
RESULTS_FILE = "results.json"
SHOWN_FIELDS = 3  # differing fields named in a StaleRun line


def resolve_config(config_path: str, overrides: Sequence[str]) -> dict[str, Any]:
    """The full config ``python -m lbsgd.main --config=<config_path> <overrides>`` runs with, as it records it
    in ``WORKDIR/config.json``: the file and the ``--config.*`` ``overrides`` parsed as lbsgd.main parses them
    (ml_collections' config flag), ``b_noise_from`` resolved (``lbsgd.config.validate.resolve_b_noise``), as
    JSON values (``lbsgd.checkpoint._plain``). Raises ``ConfigError`` (one line) when lbsgd.main would refuse
    the file or an override."""
    from absl import flags
    from ml_collections import config_flags

    from lbsgd import checkpoint
    from lbsgd.config import validate

    argv = ["lbsgd.main", f"--config={config_path}", *overrides]
    values = flags.FlagValues()
    try:
        config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
        values(argv)
        config = values.config  # ml_collections defers load errors to the first access
    except flags.Error as e:
        raise ConfigError(f"{_one_line(e)}; check the override") from None
    except (KeyError, AttributeError):
        problem = cli.override_problem(load_config(config_path.split(":", 1)[0]), overrides)
        raise ConfigError(problem or f"an override of {' '.join(overrides)} names no field of {config_path}") from None
    except Exception as e:  # noqa: BLE001 - an error inside the user's config file or a bad value
        raise ConfigError(f"--config file {config_path!r} with {' '.join(overrides)} failed to load: "
                          f"{type(e).__name__}: {_one_line(e)}") from None
    validate.resolve_b_noise(config)
    return checkpoint._plain(config)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{'easgd': {'period': 10}}`` -> ``{'easgd.period': 10}``."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(recorded: dict, asked: dict) -> list[tuple[str, Any, Any]]:
    """The fields (dotted, sorted) whose value differs: ``(field, recorded, asked)``; a field missing on one
    side counts as ``None`` there."""
    old, new = _flat(recorded), _flat(asked)
    return [(key, old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if key not in old or key not in new or old[key] != new[key]]


def holds_run(workdir: str) -> bool:
    """Whether ``workdir`` holds (part of) a run: its config.json, a checkpoint or its results.json."""
    checkpoints = os.path.join(workdir, "checkpoints")
    return (os.path.exists(os.path.join(workdir, CONFIG_FILE)) or os.path.exists(os.path.join(workdir, RESULTS_FILE))
            or (os.path.isdir(checkpoints) and bool(os.listdir(checkpoints))))


def stale_reason(workdir: str, asked: dict) -> str | None:
    """None when ``workdir`` holds no run, or a run whose recorded config is exactly ``asked``; else why the
    run there is not the asked one (one line, without the fix)."""
    if not holds_run(workdir):
        return None
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return (
            f"{workdir} holds a run without a {CONFIG_FILE} (an older run), which cannot be checked against the asked "
            f"config"
        )
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as e:
        return f"{workdir} holds a run whose {CONFIG_FILE} is unreadable ({type(e).__name__}: {_one_line(e)[:120]})"
    if not isinstance(recorded, dict):
        return f"{workdir} holds a run whose {CONFIG_FILE} is not a JSON object"
    diff = differences(recorded, asked)
    if not diff:
        return None
    listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in diff[:SHOWN_FIELDS])
    more = f" and {len(diff) - SHOWN_FIELDS} more" if len(diff) > SHOWN_FIELDS else ""
    return f"{workdir} holds a run of another config: {listed}{more} (recorded -> asked)"


def check_planned(planned: Sequence[tuple[str, dict]]) -> None:
    """Before any run starts: every planned ``(workdir, asked config)`` must hold no run or a run of exactly the
    asked config; else ``StaleRun``, one line naming the first such workdir, its differing fields and the fix,
    and how many more there are."""
    stale = [reason for reason in (stale_reason(workdir, asked) for workdir, asked in planned) if reason]
    if stale:
        more = f"; {len(stale) - 1} more run folder(s) here hold other runs too" if len(stale) > 1 else ""
        raise StaleRun(f"{stale[0]}; use a new --workdir, or delete that folder to run it again{more}")


def is_done(workdir: str, asked: dict | None = None) -> bool:
    """Whether the run in ``workdir`` finished (its results.json exists) — with ``asked``, as exactly that
    config (its recorded config.json equals it)."""
    if not os.path.exists(os.path.join(workdir, RESULTS_FILE)):
        return False
    return asked is None or stale_reason(workdir, asked) is None


def launch_main(argv: Sequence[str], log_path: str, env: dict) -> tuple[int, str]:
    """Run ``python -m lbsgd.main <argv>`` to its end with ``env``, its standard output and then its standard
    error appended to ``log_path``; return its exit status and standard error (text). The one place a run's
    process starts."""
    with open(log_path, "a") as log:
        proc = subprocess.run([sys.executable, "-m", "lbsgd.main", *argv], stdout=log, stderr=subprocess.PIPE,
                              text=True, env=env)
        log.write(proc.stderr)
    return proc.returncode, proc.stderr


def run_main(config: str, workdir: str, overrides: Sequence[str], env: dict, name: str,
             asked: dict | None = None) -> dict:
    """Train ``config`` with ``--config.*`` ``overrides`` in ``workdir`` (or resume it) unless it is done;
    return its results.json. ``asked``: the run's resolved config (``resolve_config``); a workdir holding a
    run of another config is then refused (``StaleRun``) instead of reused or resumed. Output goes to
    ``workdir/log.txt`` (standard error after standard output). Raises ``RunFailed``, or ``RunStopped`` when
    the run was stopped by SIGINT or SIGTERM."""
    if asked is not None:
        check_planned([(workdir, asked)])
    done = os.path.join(workdir, RESULTS_FILE)
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


def slug(label: str) -> str:
    """A directory-safe name for a label (compare's settings, tune's grid points)."""
    return "".join(c if c.isalnum() or c == "-" else "_" for c in label)


def setting_args(setting, k: int, seed: int, extra: Sequence[str]) -> list[str]:
    """The ``--config.*`` overrides of one run of a comparison setting (anything with ``args(k)``, such as
    ``lbsgd.compare.Entry``) at k workers and ``seed``; ``extra`` last, so they win."""
    return [f"--config.num_workers={k}", f"--config.seed={seed}", *setting.args(k), *extra]


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


def plan_runs(prog: str, config_path: str, planned: dict) -> tuple[dict | None, int | None]:
    """Every planned run's full config (``resolve_config``), checked against its folder (``check_planned``)
    before any run starts. ``planned`` maps a key to ``(workdir, overrides)``; returns ``({key: config},
    None)``, or ``(None, exit status)`` after one line on stderr (a bad override, a stale folder, Ctrl-C)."""
    try:
        asked = {key: resolve_config(config_path, argv) for key, (_, argv) in planned.items()}
        check_planned([(workdir, asked[key]) for key, (workdir, _) in planned.items()])
    except LbsgdError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return None, e.exit_code
    except KeyboardInterrupt:
        return None, stopped(prog, 0, len(planned))
    return asked, None


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
