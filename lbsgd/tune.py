"""``python -m lbsgd.compare --tune``: each strategy setting's learning rate and momentum, chosen on held-out data.

For each strategy setting and k of the comparison, one run per point of a small grid — a multiplier of
``base_learning_rate`` × a momentum, ``--tune_grid`` (default ``DEFAULT_GRID``: 3 × 2 points) — trains with
the comparison's epoch budget and the first of ``--seeds`` on the training split less a held-out validation
split (``config.validation_fraction`` = ``--validation_fraction``, ``lbsgd.data.holdout``: a fixed seeded
choice, the same for every run), and is scored by its final accuracy on that validation split; the test
split is never read by these runs. The point with the best validation accuracy wins; ties go to the point
closest to the config's own values (smallest |log2 multiplier|, then smallest |momentum − the config's|),
then to grid order. The comparison then trains every setting with its chosen values, on the whole training
split, once per seed, evaluated on the test split, as an untuned comparison does.

The multiplier scales ``base_learning_rate`` as the setting resolves it (the config file, the setting's
overrides and ``--override``), so the rate of a run is the config's scaling rule (``lr_scaling``) applied
to ``multiplier × base_learning_rate``; a strategy's own rate-like options (EASGD's elastic α, SlowMo's and
DiLoCo's outer rates, DiLoCo's inner AdamW rate) are left as they are. Momentum is ``config.momentum``.

Every run goes through ``lbsgd.runs``: a tuning run lives in ``WORKDIR/tune/<setting>_k<k>_lr<m>_mom<μ>``,
is reused when finished with exactly the asked config, resumed when interrupted, and refused (one line)
when its folder holds another config. A tuning run that fails (a rate that diverges, say) is no candidate;
its error is kept in its folder (``tune_failed.txt``), so a rerun does not retry it (delete the folder to
retry). Outputs: ``WORKDIR/tune.csv`` (every tuning run's results.json, its multiplier, momentum and
whether it was chosen), ``WORKDIR/tune.md`` (validation accuracy of every grid point) and a section of
``compare.md`` with the chosen values and the tuned runs' test accuracy.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from lbsgd import runs
from lbsgd.errors import EXIT_FAILED, ConfigError, StaleRun

DEFAULT_GRID = "lr=0.5,1,2;momentum=0.9,0.5"
DEFAULT_VALIDATION_FRACTION = 0.2
FAILED_FILE = "tune_failed.txt"
# Overrides a tuned setting sets itself: a user's --override of them is folded into the tuned values.
TUNED_FIELDS = ("base_learning_rate", "momentum")


@dataclasses.dataclass(frozen=True)
class Point:
    """One grid point: a multiplier of ``base_learning_rate`` and a momentum."""

    lr_multiplier: float
    momentum: float

    def name(self) -> str:
        """A directory-safe name: ``lr0.5_mom0.9``."""
        return f"lr{self.lr_multiplier:g}_mom{self.momentum:g}"


@dataclasses.dataclass(frozen=True)
class Tuned:
    """A comparison setting (``lbsgd.compare.Entry``) with its chosen overrides per k: ``args(k)`` is the
    setting's overrides, then ``base_learning_rate`` and ``momentum`` as chosen for k."""

    label: str
    entry: Any
    chosen: tuple[tuple[int, tuple[str, ...]], ...]

    def args(self, k: int) -> list[str]:
        """The overrides for k workers."""
        return [*self.entry.args(k), *dict(self.chosen)[k]]


def parse_grid(text: str) -> tuple[Point, ...]:
    """``'lr=0.5,1,2;momentum=0.9,0.5'`` -> its 6 points, lr-major; a missing key takes ``DEFAULT_GRID``'s values.
    Raises ``ValueError`` (one line) for anything else."""
    default = dict(part.split("=") for part in DEFAULT_GRID.split(";"))
    given = {}
    if not text.strip():
        raise ValueError(f"--tune_grid is empty; give e.g. {DEFAULT_GRID!r}")
    for part in (p.strip() for p in text.split(";") if p.strip()):
        key, eq, values = part.partition("=")
        if not eq or key.strip() not in default or key.strip() in given:
            raise ValueError(f"--tune_grid={text!r} must look like {DEFAULT_GRID!r} (keys lr and momentum, once each)")
        given[key.strip()] = values
    axes = {}
    for key, fallback in default.items():
        try:
            values = [float(v) for v in given.get(key, fallback).split(",") if v.strip()]
        except ValueError:
            values = []
        ok = values and all(math.isfinite(v) and (v > 0 if key == "lr" else 0 <= v < 1) for v in values)
        if not ok:
            need = "positive multipliers" if key == "lr" else "momenta in [0, 1)"
            raise ValueError(f"--tune_grid {key}= needs comma-separated {need}, got {given.get(key)!r}")
        axes[key] = list(dict.fromkeys(values))
    return tuple(Point(lr, m) for lr in axes["lr"] for m in axes["momentum"])


def add_flags(ap) -> None:
    """``lbsgd.compare``'s tuning flags."""
    ap.add_argument("--tune", action="store_true",
                    help="choose each setting's learning-rate multiplier and momentum on a held-out validation split "
                         "first (docs/tuning.md)")
    ap.add_argument("--tune_grid", default=None, metavar="GRID",
                    help=f"with --tune: the grid, default {DEFAULT_GRID!r} (base_learning_rate multipliers; momenta)")
    ap.add_argument("--validation_fraction", type=float, default=None,
                    help=f"with --tune: the fraction of the training split held out (default "
                         f"{DEFAULT_VALIDATION_FRACTION})")


def check_flags(ap, args) -> None:
    """The tuning flags: ``args.grid`` (points, empty without --tune) and ``args.validation_fraction``; a bad one
    is one line and exit 2."""
    if not args.tune:
        if args.tune_grid is not None or args.validation_fraction is not None:
            ap.error("--tune_grid and --validation_fraction need --tune")
        args.grid = ()
        return
    try:
        args.grid = parse_grid(DEFAULT_GRID if args.tune_grid is None else args.tune_grid)
    except ValueError as e:
        ap.error(str(e))
    if args.validation_fraction is None:
        args.validation_fraction = DEFAULT_VALIDATION_FRACTION
    if not 0 < args.validation_fraction < 1:
        ap.error(f"--validation_fraction={args.validation_fraction} must be in (0, 1)")


def tune_dir(workdir: str, label: str, k: int, point: Point) -> str:
    """The workdir of one tuning run."""
    return os.path.join(workdir, "tune", f"{runs.slug(label)}_k{k}_{point.name()}")


def _point_args(base: dict, point: Point) -> list[str]:
    """The overrides that set ``point`` on a setting whose resolved config is ``base``."""
    return [f"--config.base_learning_rate={base['base_learning_rate'] * point.lr_multiplier!r}",
            f"--config.momentum={point.momentum!r}"]


def plan(args, extra: Sequence[str]) -> tuple[dict, dict]:
    """``(bases, planned)``: each (k, entry)'s resolved untuned config, and every tuning run as ``{(k, entry, point):
    (workdir, overrides)}``. Raises ``ConfigError`` (one line)."""
    seed = args.seed_list[0]
    bases = {(k, e): runs.resolve_config(args.config, runs.setting_args(e, k, seed, extra))
             for k in args.worker_list for e in args.entries}
    held_out = [f"--config.validation_fraction={args.validation_fraction!r}"]
    planned = {(k, e, p): (tune_dir(args.workdir, e.label, k, p),
                           runs.setting_args(e, k, seed, [*extra, *held_out, *_point_args(bases[k, e], p)]))
               for k in args.worker_list for e in args.entries for p in args.grid}
    return bases, planned


def _train_point(args, key, planned, asked, env) -> tuple[dict | None, str]:
    """Train (or reuse) one tuning run: ``(results, '')``, or ``(None, error)`` for a failed one (kept in its
    folder)."""
    k, entry, point = key
    workdir, overrides = planned[key]
    failed = os.path.join(workdir, FAILED_FILE)
    if os.path.exists(failed) and runs.stale_reason(workdir, asked[key]) is None:
        with open(failed) as f:
            return None, f.read().strip()
    name = f"tune {entry.label}, k={k}, lr x{point.lr_multiplier:g}, momentum {point.momentum:g}"
    try:
        return runs.run_main(args.config, workdir, overrides, env, name, asked=asked[key]), ""
    except runs.RunFailed as e:
        with open(failed, "w") as f:
            f.write(f"{e}\n")
        return None, str(e)


def closeness(point: Point, base: dict) -> tuple[float, float]:
    """How far ``point`` is from the setting's own values: (|log2 multiplier|, |momentum − the config's|)."""
    return abs(math.log2(point.lr_multiplier)), abs(point.momentum - base["momentum"])


def choose(grid: Sequence[Point], scores: dict, base: dict) -> Point | None:
    """The point with the best validation accuracy (``scores[point]``, None = failed); ties to the closest
    (``closeness``), then to grid order; None when every point failed."""
    done = [(i, p) for i, p in enumerate(grid) if scores.get(p) is not None]
    if not done:
        return None
    return min(done, key=lambda ip: (-scores[ip[1]], *closeness(ip[1], base), ip[0]))[1]


def _run_grid(args, planned, asked, env) -> tuple[dict, int | None]:
    """Every tuning run, one progress line each: ``({key: (results or None, error)}, None)`` or ``(.., status)``."""
    pending = sum(not runs.is_done(d) and not os.path.exists(os.path.join(d, FAILED_FILE)) for d, _ in planned.values())
    progress = runs.Progress(len(planned), pending)
    out = {}
    try:
        for i, key in enumerate(planned, 1):
            t_run, (k, entry, point) = time.time(), key
            folder = planned[key][0]
            cached = runs.is_done(folder, asked[key]) or os.path.exists(os.path.join(folder, FAILED_FILE))
            out[key] = results, error = _train_point(args, key, planned, asked, env)
            what = f"tune {entry.label}, k={k}, lr x{point.lr_multiplier:g}, momentum {point.momentum:g}"
            result = (f"validation accuracy {100 * results['eval_accuracy']:.2f} %" if results else f"no candidate "
                      f"({error})")
            print(progress.line(i, what, result, time.time() - t_run, cached), flush=True)
    except (KeyboardInterrupt, runs.RunStopped):
        return out, runs.stopped("lbsgd.compare", len(out), len(planned))
    except StaleRun as e:
        print(f"lbsgd.compare: error: {e}", file=sys.stderr)
        return out, e.exit_code
    return out, None


def tune(args, extra: Sequence[str], env: dict) -> tuple[list[str], int | None]:
    """Run the tuning grid of every setting and k, choose, write tune.csv and tune.md, and replace
    ``args.entries`` by the tuned settings (``Tuned``). Returns ``(extra, None)`` — ``extra`` without the
    overrides of ``TUNED_FIELDS``, which the tuned values include — or ``(extra, exit status)`` after one line."""
    try:
        bases, planned = plan(args, extra)
    except ConfigError as e:
        print(f"lbsgd.compare: error: {e}", file=sys.stderr)
        return list(extra), e.exit_code
    asked, status = runs.plan_runs("lbsgd.compare", args.config, planned)
    if asked is None:
        return list(extra), status
    os.makedirs(os.path.join(args.workdir, "tune"), exist_ok=True)
    outcome, status = _run_grid(args, planned, asked, env)
    if status is not None:
        return list(extra), status
    args.tuning = {}
    for (k, e), base in bases.items():
        scores = {p: (outcome[k, e, p][0] or {}).get("eval_accuracy") for p in args.grid}
        best = choose(args.grid, scores, base)
        if best is None:
            first = outcome[k, e, args.grid[0]][1]
            print(f"lbsgd.compare: error: every tuning run of {e.label}, k={k} failed; first: {first}", file=sys.stderr)
            return list(extra), EXIT_FAILED
        args.tuning[e.label, k] = (best, base, scores)
    _write_outputs(args, planned, outcome)
    args.entries = [Tuned(e.label, e, tuple((k, tuple(_point_args(bases[k, e], args.tuning[e.label, k][0])))
                                             for k in args.worker_list)) for e in args.entries]
    return [a for a in extra if not a.startswith(tuple(f"--config.{f}=" for f in TUNED_FIELDS))], None


def _write_outputs(args, planned, outcome) -> None:
    """tune.csv (every tuning run) and tune.md (validation accuracy per grid point)."""
    rows = []
    for (k, e, p), (results, error) in outcome.items():
        chosen = args.tuning[e.label, k][0] == p
        rows.append({"label": e.label, "num_workers": k, "lr_multiplier": p.lr_multiplier, "momentum_tried": p.momentum,
                     "chosen": chosen, "run": planned[k, e, p][0], "error": error, **(results or {})})
    runs.write_csv(os.path.join(args.workdir, "tune.csv"), rows)
    head = " | ".join(f"×{p.lr_multiplier:g}, m {p.momentum:g}" for p in args.grid)
    lines = [_caption(args), "", f"| strategy | k | {head} |", "|---|---|" + "---|" * len(args.grid)]
    for (label, k), (best, _, scores) in args.tuning.items():
        cells = [("failed" if scores[p] is None else f"{100 * scores[p]:.2f}") + (" **chosen**" if p == best else "")
                 for p in args.grid]
        lines.append(f"| {label} | {k} | {' | '.join(cells)} |")
    with open(os.path.join(args.workdir, "tune.md"), "w") as f:
        f.write("# Validation accuracy (%) of every tuning run\n\n" + "\n".join(lines) + "\n")


def _caption(args) -> str:
    lrs = ", ".join(dict.fromkeys(f"{p.lr_multiplier:g}" for p in args.grid))
    moms = ", ".join(dict.fromkeys(f"{p.momentum:g}" for p in args.grid))
    return (f"Chosen by final accuracy on {100 * args.validation_fraction:g} % of the training split held out "
            f"(seed {args.seed_list[0]}; grid: base_learning_rate × {{{lrs}}}, momentum {{{moms}}}); the test "
            f"split was not read by the tuning runs.")


def annotate(args, rows: list[dict]) -> None:
    """Add each compare.csv row's chosen values (``tuned_lr_multiplier``, ``tuned_momentum``) after --tune."""
    for row in rows if getattr(args, "tuning", None) else ():
        best, base, _ = args.tuning[row["label"], row["num_workers"]]
        row.update(tuned_lr_multiplier=best.lr_multiplier, tuned_momentum=best.momentum,
                   tuned_base_learning_rate=base["base_learning_rate"] * best.lr_multiplier)


def table(args, rows: list[dict]) -> str:
    """compare.md's section on the tuned settings ('' without --tune): chosen values, their validation accuracy
    and the tuned runs' test accuracy, mean ± std over seeds."""
    if not getattr(args, "tuning", None):
        return ""
    lines = ["", "## Tuned learning rate and momentum", "", _caption(args), "",
             ("| strategy | k | lr multiplier | base learning rate | momentum | validation accuracy (%) | seeds "
              "| test accuracy (%) |"), "|---|---|---|---|---|---|---|---|"]
    for (label, k), (best, base, scores) in args.tuning.items():
        sel = [r for r in rows if r["label"] == label and r["num_workers"] == k]
        acc = runs.mean_std([100 * r["eval_accuracy"] for r in sel]) if sel else None
        test = f"{acc[0]:.2f} ± {acc[1]:.2f}" if acc else "failed"
        lines.append(f"| {label} | {k} | {best.lr_multiplier:g} | {base['base_learning_rate'] * best.lr_multiplier:g} "
                     f"| {best.momentum:g} | {100 * scores[best]:.2f} | {len(sel)} | {test} |")
    return "\n".join(lines) + "\n"
