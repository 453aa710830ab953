"""Stragglers: a seeded per-worker, per-step compute-time model on top of the α-β communication model.

Worker i's forward/backward of step s takes ``t[s, i] = mean × X[s, i]`` seconds, with X lognormal of
mean 1 and coefficient of variation CV (σ² = ln(1 + CV²), μ = −σ²/2, so E[X] = 1 and std X = CV): the
usual model of heavy-ish tailed compute times (Dean & Barroso 2013, "The tail at scale"; Chen et al.
2016, "Revisiting distributed synchronous SGD", who measure such tails and add backup workers). X is a
pure function of (seed, step, worker) — a counter-based hash, no generator state — so the same run has
the same times on any layout and for any number of steps simulated. CV 0 makes every time equal to the
mean, and every modelled step time equal to the plain α-β formula of ``Strategy.step_time``. A measured
trace (a CSV or JSON table of seconds, one row per step and one column per worker) can be replayed
instead: row s mod R, column i mod W.

Two uses:

* ``run_time``: the modelled seconds per step of a synchronous or decentralized strategy from an
  [S, k] table of compute times, by an event recurrence over steps. Worker i ends step s at
  e_i(s) = max_{j ∈ N_s(i)} (e_j(s−1) + cost_j(s)) + comm_s, where N_s(i) is whom it waits for at the end
  of step s (everyone for an allreduce, its in-neighbours for D-PSGD and gossip, itself on a local step)
  and cost is the compute time (or max(compute, comm) when communication overlaps it). The time of the
  run is the last worker's end; divided by S it is the mean step time.
* ``simulate_ps``: the asynchronous parameter server, event by event. Each worker loops pull → compute →
  push with no barrier; the server applies the gradients one at a time in push-time order (ties: lower
  worker first); a worker pulls right after its own push is applied. A gradient's staleness is the number
  of server updates between its pull and its push (Lian et al. 2015's τ, Dutta et al. 2018, "Slow and
  stale gradients can win the race"). ``refresh_table`` turns that schedule into the rounds of
  ``lbsgd.strategies.async_ps`` (``config.async_ps.delay='simulated'``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable

import numpy as np

from lbsgd.errors import ConfigError

ALL = "all"  # ``run_time``'s wait set: every worker (a barrier)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def check_cv(cv) -> str | None:
    """None when ``cv`` is a coefficient of variation the lognormal model accepts (a finite number >= 0),
    else one line saying why."""
    if isinstance(cv, bool) or not isinstance(cv, (int, float)) or not math.isfinite(cv) or cv < 0:
        return f"straggler CV {cv!r} must be a finite number >= 0 (0: no stragglers; 0.1: 10 % spread)"
    return None


def lognormal_params(cv: float) -> tuple[float, float]:
    """(μ, σ) of the lognormal with mean 1 and coefficient of variation ``cv``: σ² = ln(1 + CV²), μ = −σ²/2."""
    error = check_cv(cv)
    if error:
        raise ConfigError(error)
    var = math.log1p(cv * cv)
    return -var / 2.0, math.sqrt(var)


def _mix(x):
    """splitmix64's finaliser (Steele, Lea & Flood 2014) on uint64 arrays."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniform(seed: int, steps, workers, stream: int):
    """Uniform (0, 1) draws, a pure function of (seed, step, worker, stream): [len(steps), len(workers)]."""
    with np.errstate(over="ignore"):
        s = _mix(np.asarray([seed & (2**64 - 1)], np.uint64) * _GOLDEN + np.uint64(stream))
        h = _mix(s ^ np.asarray(steps, np.uint64)[:, None] * _GOLDEN)
        h = _mix(h ^ (np.asarray(workers, np.uint64)[None, :] + np.uint64(1)) * np.uint64(0xD1B54A32D192ED03))
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def draws(seed: int, steps, workers, cv: float) -> np.ndarray:
    """X[s, i]: lognormal, mean 1, coefficient of variation ``cv``, for the given steps and workers; a pure
    function of (seed, step, worker) (Box–Muller on two hashed uniforms)."""
    mu, sigma = lognormal_params(cv)
    u1, u2 = _uniform(seed, steps, workers, 1), _uniform(seed, steps, workers, 2)
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return np.exp(mu + sigma * z)


def load_trace(path: str) -> np.ndarray:
    """A measured trace of compute seconds, [R steps, W workers], from a CSV (rows of numbers, an optional
    header) or a JSON file (a list of rows, or {"times": rows}); bad files raise ``ConfigError``."""
    if not os.path.isfile(path):
        raise ConfigError(f"straggler trace {path!r} does not exist; pass a CSV or JSON table of seconds "
                          f"(one row per step, one column per worker)")
    try:
        if path.endswith(".json"):
            with open(path) as f:
                data = json.load(f)
            rows = data["times"] if isinstance(data, dict) else data
            table = np.asarray(rows, np.float64)
        else:
            with open(path) as f:
                lines = [ln for ln in f.read().splitlines() if ln.strip()]
            if lines and not _numeric(lines[0]):
                lines = lines[1:]  # a header
            table = np.asarray([[float(v) for v in ln.split(",")] for ln in lines], np.float64)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ConfigError(f"straggler trace {path!r} is not a table of numbers ({type(e).__name__}); give one "
                          f"row per step and one column per worker") from None
    if table.ndim == 1 and table.size:
        table = table[:, None]
    if table.ndim != 2 or table.size == 0 or not np.all(np.isfinite(table)) or np.any(table <= 0):
        raise ConfigError(f"straggler trace {path!r} must be a non-empty rectangular table of positive seconds "
                          f"(one row per step, one column per worker)")
    return table


def _numeric(line: str) -> bool:
    """True when every comma-separated field of ``line`` is a number."""
    try:
        [float(v) for v in line.split(",")]
        return True
    except ValueError:
        return False


def compute_times(num_steps: int, num_workers: int, mean_s: float, cv: float = 0.0, seed: int = 0,
                  trace: np.ndarray | None = None, start: int = 0) -> np.ndarray:
    """t[s, i] for steps start … start + num_steps − 1: ``mean_s`` × lognormal(mean 1, ``cv``) seeded by
    (seed, step, worker), or the ``trace`` replayed (row s mod R, column i mod W; ``mean_s`` unused)."""
    steps = np.arange(start, start + num_steps)
    if trace is not None:
        return trace[np.ix_(steps % trace.shape[0], np.arange(num_workers) % trace.shape[1])].astype(np.float64)
    if cv == 0:
        return np.full((num_steps, num_workers), float(mean_s))
    return mean_s * draws(seed, steps, np.arange(num_workers), cv)


def per_worker(compute) -> bool:
    """True when ``compute`` is an [S, k] table of per-worker compute times rather than one number."""
    return isinstance(compute, np.ndarray) and compute.ndim == 2


def run_time(compute: np.ndarray, sync: Callable[[int], tuple], overlap: bool = False) -> float:
    """Mean modelled seconds per step over the [S, k] ``compute`` table, by the recurrence of the module
    docstring. ``sync(s)`` gives (waits, comm_s) for step s: waits None (each worker on its own), ``ALL``
    (a barrier) or a [k, k] array whose row i is nonzero at the workers whose step-s results worker i needs;
    comm_s the seconds of communication after it. ``overlap``: the step costs max(compute, comm) instead of
    compute + comm (communication hidden behind compute)."""
    S, k = compute.shape
    end = np.zeros(k)
    for s in range(S):
        waits, comm = sync(s)
        own = end + (np.maximum(compute[s], comm) if overlap else compute[s])
        extra = 0.0 if overlap else comm
        if waits is None:
            end = own + extra
        elif isinstance(waits, str):
            end = np.full(k, own.max() + extra)
        else:
            end = np.where(np.asarray(waits) != 0, own[None, :], -np.inf).max(axis=1) + extra
    return float(end.max()) / S


@dataclasses.dataclass(frozen=True)
class PSSchedule:
    """The asynchronous parameter server's schedule, [J cycles, k workers] each (``simulate_ps``).

    ``update[j, i]``: the server update (0, 1, …) that applies worker i's j-th gradient; ``version[j, i]``:
    the number of updates applied when it pulled the model that gradient is taken at; ``staleness`` =
    update − version; ``push_time``: when it arrives. Only gradients with update < ``num_updates`` count
    (``valid``)."""

    update: np.ndarray
    version: np.ndarray
    push_time: np.ndarray
    num_updates: int

    @property
    def valid(self) -> np.ndarray:
        """The gradients among the first ``num_updates`` applied."""
        return self.update < self.num_updates

    @property
    def staleness(self) -> np.ndarray:
        """Server updates between each gradient's pull and its push."""
        return self.update - self.version

    def staleness_stats(self) -> dict:
        """Mean, maximum and histogram (counts of staleness 0, 1, …, max) of the applied gradients."""
        s = self.staleness[self.valid]
        return {"mean": float(s.mean()), "max": int(s.max()), "histogram": np.bincount(s).tolist()}

    def run_time(self) -> float:
        """Seconds until the server has applied ``num_updates`` gradients."""
        return float(np.max(self.push_time[self.valid]))


def simulate_ps(cycle_times: Callable[[int], np.ndarray], num_updates: int) -> PSSchedule:
    """The event-driven schedule of an asynchronous parameter server (module docstring) until it has applied
    ``num_updates`` gradients. ``cycle_times(J)`` gives each worker's first J cycle times [J, k] (pull +
    compute + push; a prefix of a longer call's). Worker i's j-th push is at the sum of its first j + 1
    cycles; the pushes are ranked by (time, worker) and each pull sees every update up to its own push."""
    J = 8
    while True:
        cycles = np.asarray(cycle_times(J), np.float64)
        k = cycles.shape[1]
        push = np.cumsum(cycles, axis=0)
        if J * k >= num_updates:
            order = np.lexsort((np.broadcast_to(np.arange(k), push.shape).ravel(), push.ravel()))
            if num_updates == 0 or push[-1].min() > push.ravel()[order[num_updates - 1]]:
                break  # every worker's simulated pushes reach past the last update that counts
        J *= 2
    update = np.empty(push.size, np.int64)
    update[order] = np.arange(push.size)
    update = update.reshape(push.shape)
    version = np.vstack([np.zeros((1, k), np.int64), update[:-1] + 1])
    return PSSchedule(update=update, version=version, push_time=push, num_updates=num_updates)


def refresh_table(schedule: PSSchedule, num_steps: int) -> np.ndarray:
    """[num_steps, k] bool: worker i refreshes its copy after round t (the server's t-th step of k
    updates) when it pulled a version in (t·k, (t + 1)·k], i.e. during round t. Its gradients of the
    following rounds are then taken at the server's model after round t: the simulated staleness rounded
    down to whole rounds (a gradient less than a round old counts as fresh)."""
    k = schedule.update.shape[1]
    out = np.zeros((num_steps, k), bool)
    v = schedule.version
    rounds = (v - 1) // k
    keep = (v > 0) & (rounds < num_steps)
    out[rounds[keep], np.broadcast_to(np.arange(k), v.shape)[keep]] = True
    return out


def ages(refresh: np.ndarray) -> np.ndarray:
    """[S, k]: the age in rounds of the copy each worker's gradient of step t is taken at, from a
    ``refresh_table`` (0 at step 0; 0 after a refresh, else one more than the step before)."""
    out = np.zeros(refresh.shape, np.int64)
    for t in range(1, refresh.shape[0]):
        out[t] = np.where(refresh[t - 1], 0, out[t - 1] + 1)
    return out
