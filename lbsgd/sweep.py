r"""A grid of runs and the paper's figures in miniature: ``python -m lbsgd.sweep --config=... --grid=...``.

Each ``--grid`` is a Cartesian product of config overrides, axes separated by ``;`` and values by
``,``; several ``--grid`` flags add their cells together (duplicates once). For instance Goyal et al.'s
Figure 1 and Table 1 on digits, the global minibatch kn grown through k at n = 16::

    python -m lbsgd.sweep --config=experiments/digits.py --workdir=runs/sweep --seeds=0,1,2 \
        --grid="num_workers=1,2,4,8,16,32,64;warmup=gradual,none,constant" \
        --grid="num_workers=1,2,4,8,16,32,64;lr_scaling=saturating;b_noise=512" \
        --grid="num_workers=64;optimizer=lars"

Every (cell, seed) is one ``python -m lbsgd.main`` run in ``WORKDIR/<cell>/seed<s>``, one after another.
A finished run of exactly the config asked for (its recorded config.json equals the config file with every
override the run gets, ``lbsgd.runs.resolve_config``) is not rerun; an interrupted one resumes from its
checkpoint; so rerunning the same command finishes an interrupted sweep. A run folder holding a run of
another config (other ``--override`` values, say) is refused before any run starts: one line naming the
folder and the differing fields, exit status 2. One progress line per run (runs done /
total, elapsed, ETA). Runs share JAX's persistent compilation cache (``WORKDIR/.jax_cache``), so seeds
after the first skip compiling.

Outputs in ``WORKDIR``:

* ``sweep.csv`` — one row per (cell, seed): the cell, its overrides, every results.json field and the
  final epoch's training error;
* ``sweep.md`` — mean ± std over seeds per cell; ``sweep_by_kn.md`` — test error by kn (rows) and
  variant (columns);
* ``sweep_error_vs_kn.png`` — final test error against kn, one line per variant (a variant = a cell's
  overrides other than ``num_workers`` and ``per_worker_batch_size``): Figure 1 / Table 1;
* ``sweep_train_curves.png`` — training loss against epochs, one panel per kn, each variant against the
  smallest kn of the first variant (dashed): Figures 2–3;
* ``sweep_train_vs_test.png`` — training and test error against kn: the "no generalization
  degradation" claim.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import time
from typing import Sequence

from lbsgd import cli, runs
from lbsgd.errors import GridError, StaleRun

BATCH_FIELDS = ("num_workers", "per_worker_batch_size")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of the grid: its overrides as ``(field, value)`` pairs, in the order given."""

    overrides: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        """A directory-safe name, e.g. ``num_workers-8_warmup-gradual``."""
        safe = lambda t: "".join(c if c.isalnum() or c in ".-" else "_" for c in t)  # noqa: E731
        return "_".join(f"{safe(f)}-{safe(v)}" for f, v in self.overrides) or "default"

    @property
    def label(self) -> str:
        """``field=value`` pairs joined by spaces."""
        return " ".join(f"{f}={v}" for f, v in self.overrides) or "default"

    @property
    def variant(self) -> str:
        """The overrides other than the batch fields: which line of a figure the cell belongs to."""
        return " ".join(f"{f}={v}" for f, v in self.overrides if f not in BATCH_FIELDS) or "default"

    def args(self) -> list[str]:
        """``--config.field=value`` flags."""
        return [f"--config.{f}={v}" for f, v in self.overrides]


def _lookup(config, field: str):
    """The config's current value of a dotted ``field``; KeyError if it does not exist."""
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def _check_value(field: str, value: str, current) -> None:
    """``value`` must parse as the type of the config's ``current`` value."""
    try:
        if isinstance(current, bool):
            if value.lower() not in ("true", "false"):
                raise ValueError
        elif isinstance(current, int):
            int(value)
        elif isinstance(current, float):
            float(value)
    except ValueError:
        raise GridError(f"--grid value {field}={value!r} is not a {type(current).__name__} like the config's {current!r}") from None


def parse_grid(text: str, config) -> list[Cell]:
    """The cells of one ``--grid`` (``field=v1,v2;field=v1``), checked against ``config``."""
    axes, seen = [], set()
    for part in [p.strip() for p in text.split(";") if p.strip()]:
        if "=" not in part:
            raise GridError(f"--grid axis {part!r} must look like field=value1,value2")
        field, values = (s.strip() for s in part.split("=", 1))
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not field or not vals:
            raise GridError(f"--grid axis {part!r} needs a field and at least one value")
        if field in seen:
            raise GridError(f"--grid names {field!r} twice; give all its values in one axis")
        if field == "seed":
            raise GridError("seeds are not a grid axis; use --seeds=0,1,2")
        seen.add(field)
        try:
            current = _lookup(config, field)
        except (KeyError, AttributeError):
            raise GridError(f"--grid field {field!r} is not a config field; use a field of the config file") from None
        for v in vals:
            _check_value(field, v, current)
        axes.append([(field, v) for v in vals])
    if not axes:
        raise GridError(f"--grid={text!r} is empty; e.g. --grid='num_workers=1,2,4;warmup=gradual,none'")
    return [Cell(tuple(combo)) for combo in itertools.product(*axes)]


def plan(grids: Sequence[str], config) -> list[Cell]:
    """All cells of every grid, in order, each once."""
    cells = []
    for text in grids:
        cells += [c for c in parse_grid(text, config) if c not in cells]
    return cells


def run_dir(workdir: str, cell: Cell, seed: int) -> str:
    """The workdir of one (cell, seed) run."""
    return os.path.join(workdir, cell.name, f"seed{seed}")


def cell_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by cell label, in first-seen order."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["cell"], []).append(r)
    return out


def _fmt(values: list, scale: float = 1.0, digits: int = 2) -> str:
    vals = [scale * v for v in values if v is not None]
    if not vals:
        return "–"
    m, s = runs.mean_std(vals)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(vals) > 1 else f"{m:.{digits}f}"


def summary_table(rows: list[dict]) -> str:
    """sweep.md: one line per cell, mean ± std over its seeds."""
    lines = [
        "| cell | kn | seeds | test error (%) | train error (%) | final train loss | peak lr | steps | B_simple at the end | B_simple over the run | run wall_time_s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, sel in cell_rows(rows).items():
        lines.append(
            f"| {label} | {sel[0]['global_batch_size']} | {len(sel)} "
            f"| {_fmt([r['eval_top1_error'] for r in sel], 100)} "
            f"| {_fmt([r.get('final_train_error') for r in sel], 100)} "
            f"| {_fmt([r.get('final_train_loss') for r in sel], 1, 3)} "
            f"| {sel[0]['peak_learning_rate']:.4g} | {sel[0]['steps']} "
            f"| {_fmt([r.get('noise_scale') for r in sel], 1, 0)} "
            f"| {_fmt([r.get('noise_scale_run') for r in sel], 1, 0)} "
            f"| {_fmt([r['wall_time_s'] for r in sel], 1, 0)} |"
        )
    return "\n".join(lines) + "\n"


def pivot_table(rows: list[dict]) -> str:
    """sweep_by_kn.md: test error (%) mean ± std over seeds, one row per kn, one column per variant."""
    variants = _by_variant(rows)
    kns = sorted({r["global_batch_size"] for r in rows})
    lines = ["| kn | steps | " + " | ".join(variants) + " |", "|---" * (len(variants) + 2) + "|"]
    for kn in kns:
        steps = next(r["steps"] for r in rows if r["global_batch_size"] == kn)
        cells = [_fmt([r["eval_top1_error"] for r in by_kn.get(kn, [])], 100) for by_kn in variants.values()]
        lines.append(f"| {kn} | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _by_variant(rows: list[dict]) -> dict[str, dict[int, list[dict]]]:
    """variant -> kn -> rows (every seed)."""
    out: dict[str, dict[int, list[dict]]] = {}
    for r in rows:
        out.setdefault(r["variant"], {}).setdefault(r["global_batch_size"], []).append(r)
    return out


def plot(workdir: str, rows: list[dict], histories: dict[str, list[dict]]) -> list[str]:
    """The three figures; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    variants = _by_variant(rows)
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
    paths = []

    def save(fig, name):
        fig.tight_layout()
        path = os.path.join(workdir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    # Figure 1 / Table 1: final test error against kn.
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for v, by_kn in variants.items():
        kns = sorted(by_kn)
        err = [[100 * r["eval_top1_error"] for r in by_kn[kn]] for kn in kns]
        ax.errorbar(kns, [np.mean(e) for e in err], yerr=[np.std(e, ddof=1) if len(e) > 1 else 0 for e in err],
                    marker="o", capsize=3, color=colors[v], label=v)
    ax.set(xscale="log", yscale="log", xlabel="global minibatch kn", ylabel="final test error (%)",
           title="Test error against minibatch size (mean ± std over seeds)")
    ax.set_xticks(sorted({r["global_batch_size"] for r in rows}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save(fig, "sweep_error_vs_kn.png")

    # Figures 2-3: training loss against epochs, each kn against the smallest kn (the first variant's).
    def mean_curve(sel):
        curves = [c for c in (histories.get(r["run"], []) for r in sel) if c]
        if not curves:
            return None, None
        length = min(len(c) for c in curves)
        return [e["epoch"] for e in curves[0][:length]], np.mean([[e["train_loss"] for e in c[:length]] for c in curves], axis=0)

    all_kns = sorted({r["global_batch_size"] for r in rows})
    base_variant = next(iter(variants))
    ref_kn = min(variants[base_variant])
    ref_epochs, ref_loss = mean_curve(variants[base_variant][ref_kn])
    panels = [kn for kn in all_kns if kn != ref_kn] or all_kns
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, kn in zip(axes.flat, panels):
        if ref_epochs is not None:
            ax.plot(ref_epochs, ref_loss, "--", color="black", lw=1.3, label=f"kn = {ref_kn}, {base_variant}")
        for v, by_kn in variants.items():
            epochs, loss = mean_curve(by_kn.get(kn, []))
            if epochs is not None:
                ax.plot(epochs, loss, "-", color=colors[v], lw=1.3, label=v)
        ax.set(title=f"kn = {kn}", xlabel="epoch", ylabel="training loss", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"Training loss against epochs, mean over seeds; dashed: kn = {ref_kn} (Goyal et al. Figures 2-3)")
    save(fig, "sweep_train_curves.png")

    # Train vs test error against kn.
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for v, by_kn in variants.items():
        kns = sorted(by_kn)
        test = [np.mean([100 * r["eval_top1_error"] for r in by_kn[kn]]) for kn in kns]
        train = [np.mean([100 * (r.get("final_train_error") or np.nan) for r in by_kn[kn]]) for kn in kns]
        ax.plot(kns, test, "o-", color=colors[v], label=f"{v}: test")
        ax.plot(kns, train, "s--", color=colors[v], alpha=0.7, label=f"{v}: train (last epoch)")
    ax.set(xscale="log", yscale="log", xlabel="global minibatch kn", ylabel="error (%)",
           title="Training and test error against minibatch size")
    ax.set_xticks(all_kns)
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save(fig, "sweep_train_vs_test.png")
    return paths


EXAMPLES = (
    'python -m lbsgd.sweep --config=experiments/digits.py --grid="num_workers=1,2,4,8;warmup=gradual,none" --list',
    "python -m lbsgd.sweep --config=experiments/digits.py --workdir=runs/sweep --seeds=0,1,2 "
    '--grid="num_workers=1,2,4,8,16,32,64;warmup=gradual,none,constant"',
    "python -m lbsgd.sweep --config=experiments/digits.py --workdir=runs/lars --seeds=0 "
    '--grid="num_workers=32,64;optimizer=goyal_sgd,lars" --override=num_epochs=10 --cpu_devices=8',
)


def make_parser() -> cli.ArgumentParser:
    """The flags of ``lbsgd.sweep``."""
    ap = cli.ArgumentParser(prog="python -m lbsgd.sweep", description=__doc__.split("\n\n")[0], examples=EXAMPLES)
    cli.add_run_flags(ap, workdir="runs/sweep", workdir_help="one folder per (cell, seed), and the tables and figures",
                      cpu_devices=0)
    ap.add_argument(
        "--grid", action="append", default=[], help="field=v1,v2;field=v1,...: a product of overrides (repeatable)"
    )
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, each run for every cell")
    ap.add_argument("--list", action="store_true", help="print the cells and exit")
    return ap


def parse(argv):
    """Flags; bad ones are one line and exit 2."""
    ap = make_parser()
    args = ap.parse_args(argv)
    if not os.path.isfile(args.config):
        ap.error(f"--config file {args.config!r} does not exist; pass an experiments/*.py file")
    try:
        args.seed_list = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--seeds={args.seeds!r} must be comma-separated integers")
    if not args.seed_list or len(set(args.seed_list)) != len(args.seed_list):
        ap.error(f"--seeds={args.seeds!r} needs at least one seed, each once")
    if not args.grid:
        ap.error("give at least one --grid, e.g. --grid='num_workers=1,2,4,8;warmup=gradual,none'")
    bad = [o for o in args.override if "=" not in o]
    if bad:
        ap.error(f"--override {bad[0]!r} must look like num_epochs=10")
    try:
        config = runs.load_config(args.config)
        args.cells = plan(args.grid, config)
    except GridError as e:
        ap.error(str(e))
    except Exception as e:  # noqa: BLE001 - an error inside the user's config file
        ap.error(f"--config file {args.config!r} failed to load: {type(e).__name__}: {e}")
    return args


def final_training(history: list[dict]) -> dict:
    """The last epoch's training loss and error (from train_history.jsonl), or None values."""
    if not history:
        return {"final_train_loss": None, "final_train_error": None}
    last = history[-1]
    return {"final_train_loss": last["train_loss"], "final_train_error": 1.0 - last["train_accuracy"]}


def run_overrides(args, cell: Cell, seed: int) -> list[str]:
    """The ``--config.*`` overrides of one run: ``--override``, then the cell's, then the seed."""
    return [*[f"--config.{o}" for o in args.override], *cell.args(), f"--config.seed={seed}"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) every (cell, seed), then write sweep.csv, sweep.md and the figures."""
    cli.require_train_extra("lbsgd.sweep")  # the configs and the runs need lbsgd[train]
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.list:
        print("\n".join(c.label for c in args.cells))
        print(f"{len(args.cells)} cells x {len(args.seed_list)} seeds = {len(args.cells) * len(args.seed_list)} runs")
        return 0
    todo = [(seed, cell) for seed in args.seed_list for cell in args.cells]  # seed-major: every cell early
    overrides = {(seed, cell): run_overrides(args, cell, seed) for seed, cell in todo}
    planned = {(s, c): (run_dir(args.workdir, c, s), overrides[s, c]) for s, c in todo}
    asked, status = runs.plan_runs("lbsgd.sweep", args.config, planned)
    if asked is None:
        return status
    os.makedirs(args.workdir, exist_ok=True)
    env = runs.child_env(args.cpu_devices, compilation_cache=os.path.join(args.workdir, ".jax_cache"))
    progress = runs.Progress(len(todo), sum(not runs.is_done(run_dir(args.workdir, c, s)) for s, c in todo))
    rows, histories, failures = [], {}, []
    try:
        for i, (seed, cell) in enumerate(todo, 1):
            path = run_dir(args.workdir, cell, seed)
            cached, t_run = runs.is_done(path, asked[seed, cell]), time.time()
            try:
                results = runs.run_main(args.config, path, overrides[seed, cell], env, f"{cell.label}, seed {seed}",
                                        asked=asked[seed, cell])
            except runs.RunFailed as e:
                failures.append(str(e))
                print(f"[{i}/{len(todo)}] {e}", flush=True)
                continue
            histories[path] = runs.history(path, "train_history.jsonl")
            row = {"cell": cell.label, "variant": cell.variant, "seed": seed, "run": path,
                   **{f"set_{f}": v for f, v in cell.overrides}, **final_training(histories[path]), **results}
            rows.append(row)
            result = f"test error {100 * results['eval_top1_error']:.2f} % (kn={results['global_batch_size']})"
            print(progress.line(i, f"{cell.label}, seed {seed}", result, time.time() - t_run, cached), flush=True)
    except (KeyboardInterrupt, runs.RunStopped):
        return runs.stopped("lbsgd.sweep", len(rows), len(todo))
    except StaleRun as e:  # a folder changed under the sweep since the check above
        print(f"lbsgd.sweep: error: {e}", file=sys.stderr)
        return e.exit_code
    if rows:
        order = {c.label: i for i, c in enumerate(args.cells)}
        rows.sort(key=lambda r: (order[r["cell"]], r["seed"]))
        runs.write_csv(os.path.join(args.workdir, "sweep.csv"), rows)
        with open(os.path.join(args.workdir, "sweep.md"), "w") as f:
            f.write(summary_table(rows))
        with open(os.path.join(args.workdir, "sweep_by_kn.md"), "w") as f:
            f.write(pivot_table(rows))
        for p in plot(args.workdir, rows, histories):
            print(f"wrote {p}")
        print(f"wrote {os.path.join(args.workdir, 'sweep.csv')} and sweep.md ({len(rows)} runs, {progress.minutes:.1f} min)")
    return runs.exit_status("lbsgd.sweep", failures)


if __name__ == "__main__":
    sys.exit(main())
