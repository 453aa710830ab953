"""Merges the Jin et al. study's comparisons (benchmarks/jin_mnist1d/run.sh) into one summary.

Usage: python benchmarks/jin_mnist1d/summarize.py WORKDIR [OUTDIR] [--targets=PCT,PCT,...]

Reads WORKDIR/*/compare.csv (one per `lbsgd.compare` call of the study) and each run's evaluation history,
and writes, to OUTDIR (default WORKDIR), for each target test error (%, default 5,10,25; the first is
the figure's):

* ``summary.md`` — the tuned runs' test error and chosen momentum per strategy and p; per network and
  model size, the modelled seconds to the target test error per strategy and p without stragglers and
  with CV 0.1 and 0.5; and the fastest strategy at each p (where the asynchronous/synchronous crossover
  lies);
* ``time_to_target.png`` — seconds to the target against p, one line per strategy, a panel per network
  (10 GbE with ResNet-50-sized messages, communication-bound; InfiniBand with the model as it is,
  compute-bound) and straggler CV.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import sys

from lbsgd import runs, straggler_report

SIM = "async_ps simulated"  # the label given here to the parameter server with simulated pulls
CVS = ("cv=0", "cv=0.1", "cv=0.5")
PANELS = ("10GbE ResNet-50", "IB56 ResNet-50", "10GbE as-is", "IB56 as-is")


def _num(text):
    """A csv cell as a float, or None when empty."""
    return float(text) if text not in ("", None) else None


def load(workdir: str) -> list[dict]:
    """Every run of every comparison in WORKDIR; the parameter server trained on a simulated schedule is
    relabelled ``async_ps simulated``."""
    rows = []
    for path in sorted(glob.glob(os.path.join(workdir, "*", "compare.csv"))):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("label") == "async_ps tau=k-1" and os.path.basename(os.path.dirname(path)).startswith("ps_sim"):
                    row["label"] = SIM
                rows.append(row)
    return rows


def add_targets(rows: list[dict], targets) -> None:
    """Adds ``time_to_target_s <T> <cv> <panel>`` to every row: the first evaluated step at or below T % test
    error (the run folder's evaluations, ``lbsgd.runs.history``) × the modelled seconds per step (``step_s <cv> <panel>``)."""
    for row in rows:
        history = runs.history(row["run"])
        for target in targets:
            reached = straggler_report.steps_to(history, target)
            for cv in CVS:
                for panel in PANELS:
                    step = _num(row.get(f"step_s {cv} {panel}"))
                    row[f"time_to_target_s {target:g} {cv} {panel}"] = (
                        None if reached is None or step is None else reached * step)


def _order(rows):
    labels = []
    for r in rows:
        if r["label"] not in labels:
            labels.append(r["label"])
    return labels


def _fmt(x):
    return "—" if x is None else (f"{x:.3g}" if x < 100 else f"{x:,.0f}")


def summary(rows: list[dict], targets) -> str:
    """summary.md's text."""
    ks = sorted({int(r["num_workers"]) for r in rows})
    labels = _order(rows)
    at = {(r["label"], int(r["num_workers"])): r for r in rows}
    out = ["# Jin et al. in miniature: summary", "",
           f"Target test errors: {', '.join(f'{t:g} %' for t in targets)}. One seed per cell (seed 0).", "",
           "## Test error (%) of the tuned runs (chosen learning-rate multiplier, momentum)", "",
           "| strategy | " + " | ".join(f"p = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for label in labels:
        cells = []
        for k in ks:
            r = at.get((label, k))
            cells.append("" if r is None else f"{100 * (1 - float(r['eval_accuracy'])):.2f} "
                         f"(×{_num(r.get('tuned_lr_multiplier')) or 1:g}, {_num(r.get('tuned_momentum')) or 0:g})")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    for target, panel in [(t, p) for t in targets for p in PANELS]:
        key = f"time_to_target_s {target:g}"
        out += ["", f"## Modelled seconds to {target:g} % test error, {panel}", "",
                "| strategy | " + " | ".join(f"p = {k} {cv}" for cv in CVS for k in ks) + " |",
                "|---|" + "---|" * (len(ks) * len(CVS))]
        for label in labels:
            cells = []
            for cv in CVS:
                for k in ks:
                    r = at.get((label, k))
                    cells.append("" if r is None else _fmt(r.get(f"{key} {cv} {panel}")))
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out += ["", f"Fastest to {target:g} %, {panel} (its seconds; the asynchronous server's and allreduce's):", "",
                "| CV | " + " | ".join(f"p = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for cv in CVS:
            cells = []
            for k in ks:
                times = {lab: at[lab, k].get(f"{key} {cv} {panel}") for lab in labels if (lab, k) in at}
                reached = {lab: t for lab, t in times.items() if t is not None}
                if not reached:
                    cells.append("none reached")
                    continue
                best = min(reached, key=reached.get)
                ps = min([t for lab, t in reached.items() if lab.startswith("async_ps")], default=None)
                cells.append(f"{best} ({_fmt(reached[best])}; PS {_fmt(ps)}, AR {_fmt(reached.get('allreduce'))})")
            out.append(f"| {cv} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], target: float, path: str) -> None:
    """time_to_target.png: seconds to ``target`` % test error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({int(r["num_workers"]) for r in rows})
    labels = _order(rows)
    at = {(r["label"], int(r["num_workers"])): r for r in rows}
    nets = ("10GbE ResNet-50", "IB56 as-is")  # communication-bound and compute-bound
    fig, axes = plt.subplots(len(nets), len(CVS), figsize=(4.2 * len(CVS), 3.4 * len(nets)), sharex=True, squeeze=False)
    for i, panel in enumerate(nets):
        for j, cv in enumerate(CVS):
            ax = axes[i][j]
            for label in labels:
                xs, ys = [], []
                for k in ks:
                    t = at[label, k].get(f"time_to_target_s {target:g} {cv} {panel}") if (label, k) in at else None
                    if t is not None and math.isfinite(t):
                        xs.append(k)
                        ys.append(t)
                if xs:
                    ax.plot(xs, ys, marker="o", ms=3, label=label, ls="--" if label.startswith("async") else "-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{panel}, stragglers {cv}: to {target:g} % error", fontsize=8)
            ax.set_xlabel("p (workers)")
            if j == 0:
                ax.set_ylabel("modelled s to target")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    """Writes summary.md and time_to_target.png."""
    targets = [5.0, 10.0, 25.0]
    for a in [a for a in argv if a.startswith("--targets=")]:
        targets = [float(t) for t in a.split("=", 1)[1].split(",")]
    argv = [a for a in argv if not a.startswith("--targets=")]
    if len(argv) not in (1, 2):
        print("usage: python benchmarks/jin_mnist1d/summarize.py WORKDIR [OUTDIR] [--targets=5,10,25]", file=sys.stderr)
        return 2
    rows = load(argv[0])
    if not rows:
        print(f"summarize: no compare.csv under {argv[0]!r}; run benchmarks/jin_mnist1d/run.sh first", file=sys.stderr)
        return 2
    add_targets(rows, targets)
    outdir = argv[1] if len(argv) == 2 else argv[0]
    with open(os.path.join(outdir, "summary.md"), "w") as f:
        f.write(summary(rows, targets))
    plot(rows, targets[0], os.path.join(outdir, "time_to_target.png"))
    print(f"wrote {os.path.join(outdir, 'summary.md')} and time_to_target.png ({len(rows)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
