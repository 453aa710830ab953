"""``lbsgd.compare --straggler_cv=0,0.1,0.5`` (and ``--straggler_trace``): the comparison's time model with
stragglers, and the modelled time to a target test error.

For each run and each straggler setting, the compute times of its steps are drawn per worker and step
(``lbsgd.stragglers``: lognormal with the given coefficient of variation around the run's compute time,
seeded by the run's seed; or a measured trace replayed) and the strategy's ``step_time`` waits as the
strategy does (the slowest worker for allreduce and every average, the neighbours for D-PSGD and gossip,
nobody for the parameter server). Columns added to ``compare.csv``: ``step_s cv=<CV> <net> <model>`` and
``time_to_target_s [cv=<CV> ]<net> <model>`` = the first evaluated step whose test error is at most the
target × the modelled seconds per step (empty when the run never reaches it), and ``target_error`` (%):
``--target_error``, or the worst final test error among the runs with the same k (every run reaches it).
``compare.md`` gets one table per network and model size. CV 0 gives the plain α-β columns exactly.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from lbsgd import stragglers
from lbsgd.errors import ConfigError

MAX_STEPS = 20_000  # steps simulated per run (the mean step time of longer runs is that of their first ones)


def _cv_list(text: str) -> list[float]:
    """``--straggler_cv``: comma-separated coefficients of variation >= 0."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated numbers >= 0, e.g. 0,0.1,0.5") from None
    bad = [v for v in values if stragglers.check_cv(v)]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated finite numbers >= 0, e.g. 0,0.1,0.5")
    return values


def _trace(path: str) -> np.ndarray:
    """``--straggler_trace``: a readable table of positive seconds."""
    try:
        return stragglers.load_trace(path)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_flags(ap) -> None:
    """The straggler flags of ``lbsgd.compare``."""
    ap.add_argument("--straggler_cv", type=_cv_list, default=None, metavar="CVS",
                    help="coefficients of variation of the workers' lognormal compute times to model, e.g. 0,0.1,0.5 "
                         "(adds step-time and time-to-target columns and tables; default: none)")
    ap.add_argument("--straggler_trace", type=_trace, default=None, metavar="PATH",
                    help="a CSV/JSON table of measured compute seconds (row: step, column: worker) to replay")
    ap.add_argument("--target_error", type=float, default=None, metavar="PCT",
                    help="test error (%%) for the time-to-target columns (default: the worst final error at each k)")


def settings(args) -> list[tuple[str, float, np.ndarray | None]]:
    """(column tag, CV, trace) of every straggler setting asked for; none without the flags."""
    out = [(f"cv={cv:g}", cv, None) for cv in (getattr(args, "straggler_cv", None) or [])]
    if getattr(args, "straggler_trace", None) is not None:
        out.append(("trace", 0.0, args.straggler_trace))
    return out


def active(args) -> bool:
    """True when the comparison models stragglers or a target error."""
    return bool(settings(args)) or getattr(args, "target_error", None) is not None


def step_columns(args, row: dict, compute_s: float, model: Callable[[object], dict]) -> dict:
    """``step_s cv=<CV> …`` columns of one run: ``model(compute)`` is the run's modelled step times
    (``lbsgd.compare.modelled_times``) for a compute time or an [S, k] table of them."""
    out = {}
    steps, k = max(1, min(int(row["steps"]), MAX_STEPS)), int(row["num_workers"])
    for tag, cv, trace in settings(args):
        if cv == 0 and trace is None:
            times = model(compute_s)  # the α-β formula itself
        else:
            times = model(stragglers.compute_times(steps, k, compute_s, cv, int(row.get("seed", 0)), trace))
        out.update({f"step_s {tag} {key}": seconds for key, seconds in times.items()})
    return out


def steps_to(history: list[dict], target: float) -> int | None:
    """The first evaluated step whose test error (%) is at most ``target``."""
    for e in history:
        if 100 * (1 - e["eval_accuracy"]) <= target + 1e-9:
            return int(e["step"])
    return None


def annotate_targets(args, rows: list[dict], histories: dict) -> None:
    """Adds ``target_error`` and ``time_to_target_s …`` to every row (only when ``active``)."""
    if not active(args):
        return
    for row in rows:
        same_k = [r for r in rows if r["num_workers"] == row["num_workers"]]
        target = args.target_error
        if target is None:
            target = max(100 * (1 - r["eval_accuracy"]) for r in same_k)
        row["target_error"] = target
        reached = steps_to(histories[row["run"]], target)
        for key in [key for key in row if key.startswith("step_s ")]:
            name = "time_to_target_s " + key[len("step_s "):]
            row[name] = None if reached is None else reached * row[key]


def _cell(values: list) -> str:
    """Mean over seeds, or — when a seed never reached the target."""
    return "—" if any(v is None for v in values) else f"{np.mean(values):.4g}"


def table(args, rows: list[dict], workers, labels, panels) -> str:
    """compare.md's straggler tables: per network and model size, s/step and seconds to the target error
    without stragglers and at each setting (mean over seeds)."""
    if not active(args) or not rows:
        return ""
    tags = ["", *[f"{tag} " for tag, _, _ in settings(args)]]
    names = ["none", *[tag for tag, _, _ in settings(args)]]
    out = []
    for panel in panels:
        out += [f"\n**Stragglers, {panel}**: modelled s/step and seconds to the target test error\n",
                "| strategy | k | target error (%) | " + " | ".join(f"s/step {n}" for n in names) + " | "
                + " | ".join(f"s to target {n}" for n in names) + " |",
                "|---|---|---|" + "---|" * (2 * len(names))]
        for k in workers:
            for label in labels:
                sel = [r for r in rows if r["label"] == label and r["num_workers"] == k]
                if not sel:
                    continue
                step = [_cell([r[f"step_s {t}{panel}"] for r in sel]) for t in tags]
                reach = [_cell([r.get(f"time_to_target_s {t}{panel}") for r in sel]) for t in tags]
                out.append(f"| {label} | {k} | {sel[0]['target_error']:.2f} | " + " | ".join(step + reach) + " |")
    return "\n".join(out) + "\n"

