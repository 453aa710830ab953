r"""Every strategy on the same task, data order and budget: ``python -m lbsgd.compare --config=experiments/digits.py``.

The small-scale analogue of Jin et al. 2016's error-vs-time figures. For each k in ``--workers`` and
each seed, it trains ``--config`` once per strategy (allreduce; D-PSGD on a ring, an exponential
graph, the complete graph and the one-peer exponential graph; gossip pull; gossip push-sum, random and
one-peer exponential; EASGD with τ = 1 and 10; the asynchronous parameter server with staleness
k−1) through ``python -m lbsgd.main``, one workdir per run under ``--workdir``. A finished run of exactly
the config asked for (its recorded config.json equals the config file with every override the run gets,
``lbsgd.runs.resolve_config``) is not rerun; an interrupted one resumes from its checkpoint. A run folder
holding a run of another config (other ``--num_epochs`` or ``--override`` values, say) is refused before
any run starts: one line naming the folder and the differing fields, exit status 2. One progress line
per run.

Outputs in ``--workdir``:

* ``compare.csv`` — one row per run: every results.json field, its modelled step times and the
  modelled time to finish on each network;
* ``compare.md`` — mean ± std over seeds per strategy and k;
* ``compare_epochs.png`` — test error against epochs;
* ``compare_time_k<k>.png`` — test error against modelled wall-clock time, on 10 GbE and 56 Gb/s
  InfiniBand, with the model as it is and as large as ResNet-50 (25.6 M parameters).

``--tune`` first chooses each setting's learning-rate multiplier and momentum per k on a validation split
held out from the training set (never the test split), then runs the chosen values (``lbsgd.tune``).

**Time model.** A step lasts the compute time of one worker (its forward and backward on n examples)
plus the strategy's own communication in the α-β model (``Strategy.step_time``: a ring allreduce for
allreduce, degree messages for D-PSGD (overlapped with compute in the ``awc`` form), one message for
gossip, an allreduce every τ steps for EASGD, k messages through one server link for the parameter
server). The compute time is ``--compute_ms`` if given, else measured: n divided by the images/s of
the allreduce run with the same k (one worker's share, as if each worker had this whole machine).
``--straggler_cv``/``--straggler_trace`` add the same with seeded per-worker compute times, and the
modelled time to a target test error (``lbsgd.straggler_report``, docs/stragglers.md).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Sequence

from lbsgd import cli, costmodel, runs, straggler_report, strategies, tune
from lbsgd.errors import StaleRun
from lbsgd.strategies import registry

RESNET50_PARAMS = 25_557_032  # lbsgd.models.resnet.resnet50, counted in tests/test_models.py


@dataclasses.dataclass(frozen=True)
class Entry:
    """One strategy setting of the comparison: a label and its ``--config.*`` overrides (``{k}`` = k)."""

    label: str
    overrides: tuple[str, ...]

    def args(self, k: int) -> list[str]:
        """The overrides for k workers."""
        return [f"--config.{o.format(k=k, k_minus_1=k - 1)}" for o in self.overrides]


def entries() -> tuple[Entry, ...]:
    """Every registered strategy's comparison settings (``lbsgd.strategies.registry.compare_entries``), in
    registration order; the overrides are relative to the given config, ``strategy=<name>`` first."""
    return tuple(Entry(label, overrides) for label, overrides in registry.compare_entries())


def labels() -> tuple[str, ...]:
    """The labels of ``entries()``."""
    return tuple(e.label for e in entries())


def run_dir(workdir: str, entry: Entry, k: int, seed: int) -> str:
    """The workdir of one run."""
    return os.path.join(workdir, f"{runs.slug(entry.label)}_k{k}_seed{seed}")


def run_one(config: str, workdir: str, entry: Entry, k: int, seed: int, extra: Sequence[str], env: dict,
            asked: dict | None = None) -> dict:
    """Train one run (or resume it) and return its results.json; raises ``runs.RunFailed`` (and
    ``StaleRun`` when its folder holds a run of another config than ``asked``, its resolved config)."""
    return runs.run_main(config, run_dir(workdir, entry, k, seed), runs.setting_args(entry, k, seed, extra), env,
                         f"{entry.label}, k={k}, seed {seed}", asked=asked)


def strategy_of(resolved: dict, num_devices: int):
    """The strategy object a run builds (for its time model), from its resolved config
    (``runs.resolve_config``: the config file with every override the run got)."""
    import ml_collections

    return strategies.from_config(ml_collections.ConfigDict(resolved), num_devices)


def model_sizes(results: dict) -> dict[str, float]:
    """Model bytes for the time model: the trained model as it is, and ResNet-50 (float32)."""
    return {"as-is": 4.0 * results["num_params"], "ResNet-50": 4.0 * RESNET50_PARAMS}


def time_panels() -> list[str]:
    """The network × model size keys of ``modelled_times``, e.g. '10GbE ResNet-50'."""
    return [f"{net} {size}" for net in costmodel.NETWORKS for size in ("as-is", "ResNet-50")]


def modelled_times(strategy, results: dict, compute_s) -> dict[str, float]:
    """Modelled seconds per step on each network × model size; ``compute_s`` is one worker's compute time
    per step, or an [S, k] table of every worker's at every step (stragglers, ``lbsgd.straggler_report``)."""
    out = {}
    for net, (gbit, latency_us) in costmodel.NETWORKS.items():
        alpha, beta, _ = costmodel.model_params(gbit, latency_us, 0.0)
        for size_name, nbytes in model_sizes(results).items():
            out[f"{net} {size_name}"] = strategy.step_time(compute_s, results["num_workers"], nbytes, alpha, beta)
    return out


def summary_table(rows: list[dict], workers: Sequence[int]) -> str:
    """compare.md: one line per strategy and k, mean ± std over seeds."""
    lines = [
        "| strategy | k | seeds | test accuracy (%) | consensus distance | MB sent / worker / step | images/s "
        "| modelled s/step 10GbE (as-is / ResNet-50) | modelled s/step IB56 (as-is / ResNet-50) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in workers:
        for label in labels():
            sel = [r for r in rows if r["label"] == label and r["num_workers"] == k]
            if not sel:
                continue
            acc = runs.mean_std([100 * r["eval_accuracy"] for r in sel])
            cd = runs.mean_std([r["consensus_distance"] for r in sel])
            ips = runs.mean_std([r["images_per_second"] for r in sel])
            mb = sel[0]["bytes_sent_per_worker_per_step"] / 1e6
            t = {key: sel[0][f"step_s {key}"] for key in ("10GbE as-is", "10GbE ResNet-50", "IB56 as-is", "IB56 ResNet-50")}
            lines.append(
                f"| {label} | {k} | {len(sel)} | {acc[0]:.2f} ± {acc[1]:.2f} | {cd[0]:.2g} | {mb:.2f} | {ips[0]:,.0f} "
                f"| {t['10GbE as-is']:.4f} / {t['10GbE ResNet-50']:.3f} | {t['IB56 as-is']:.4f} / {t['IB56 ResNet-50']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def plot(workdir: str, rows: list[dict], histories: dict, workers: Sequence[int], dataset: str = "") -> list[str]:
    """compare_epochs.png and one compare_time_k<k>.png per k (``dataset`` names the data in the title);
    returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = labels()
    colors = {label: plt.cm.tab20(i / max(1, len(every) - 1)) for i, label in enumerate(every)}
    paths = []

    def curves(k):
        """label -> list over seeds of (epochs, steps, errors, row)."""
        out = {}
        for row in rows:
            if row["num_workers"] != k:
                continue
            h = histories[row["run"]]
            out.setdefault(row["label"], []).append(
                ([e["epoch"] for e in h], [e["step"] for e in h], [100 * (1 - e["eval_accuracy"]) for e in h], row)
            )
        return out

    fig, axes = plt.subplots(1, len(workers), figsize=(6 * len(workers), 4.5), squeeze=False)
    for ax, k in zip(axes[0], workers):
        for label, seeds in curves(k).items():
            for i, (epochs, _, errors, _) in enumerate(seeds):
                ax.plot(epochs, errors, color=colors[label], alpha=0.9, lw=1.2, label=label if i == 0 else None)
        ax.set(title=f"k = {k} workers", xlabel="epoch", ylabel="test error (%)", yscale="log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Test error against epochs ({dataset + '; ' if dataset else ''}every seed drawn)")
    fig.tight_layout()
    path = os.path.join(workdir, "compare_epochs.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    for k in workers:
        fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), squeeze=False)
        panels = [(net, size) for net in costmodel.NETWORKS for size in ("as-is", "ResNet-50")]
        for ax, (net, size) in zip(axes.flat, panels):
            for label, seeds in curves(k).items():
                for i, (_, steps, errors, row) in enumerate(seeds):
                    seconds = [s * row[f"step_s {net} {size}"] for s in steps]
                    ax.plot(seconds, errors, color=colors[label], lw=1.2, label=label if i == 0 else None)
            gbit, lat = costmodel.NETWORKS[net]
            nparams = rows[0]["num_params"] if size == "as-is" else RESNET50_PARAMS
            ax.set(
                title=f"{net} ({gbit:g} Gb/s, {lat:g} µs), model of {nparams / 1e6:.2f} M params ({size})",
                xlabel="modelled wall-clock time (s)",
                ylabel="test error (%)",
                xscale="log",
                yscale="log",
            )
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3)
        axes[0][1].legend(fontsize=7, loc="upper right")
        compute = rows[0].get("compute_s_per_step") if rows else None
        fig.suptitle(
            f"Test error against modelled time, k = {k} (compute {1000 * (compute or 0):.2f} ms/step per worker, "
            f"α-β communication per strategy)"
        )
        fig.tight_layout()
        path = os.path.join(workdir, f"compare_time_k{k}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


EXAMPLES = (
    "python -m lbsgd.compare --config=experiments/digits.py --list",
    "python -m lbsgd.compare --config=experiments/digits.py --workdir=runs/compare --workers=8 --seeds=0 "
    "--num_epochs=5",
    "python -m lbsgd.compare --config=experiments/digits.py --workdir=runs/compare --workers=8,16 --seeds=0,1 "
    '--strategies="allreduce,easgd tau=10" --override=weight_decay=1e-4',
)


def make_parser() -> cli.ArgumentParser:
    """The flags of ``lbsgd.compare``."""
    ap = cli.ArgumentParser(prog="python -m lbsgd.compare", description=__doc__.split("\n\n")[0], examples=EXAMPLES)
    cli.add_run_flags(ap, workdir="runs/compare", workdir_help="one folder per run, and the tables and figures",
                      cpu_devices=8)
    ap.add_argument("--workers", default="8,16", help="comma-separated k values")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1; with --tune 0,1,2)")
    ap.add_argument("--strategies", default="", help="comma-separated labels to run (default: all); see --list")
    ap.add_argument("--list", action="store_true", help="print the strategy labels and exit")
    ap.add_argument(
        "--num_epochs", type=cli.positive(int), default=None, help="epochs of every run (default: the config's)"
    )
    ap.add_argument(
        "--compute_ms",
        type=cli.positive(float),
        default=None,
        help="compute time per step per worker (default: measured from the allreduce run)",
    )
    tune.add_flags(ap)
    straggler_report.add_flags(ap)
    return ap


def parse(argv):
    """Flags; bad ones are one line and exit 2."""
    ap = make_parser()
    args = ap.parse_args(argv)
    if args.list:
        return args
    if not os.path.isfile(args.config):
        ap.error(f"--config file {args.config!r} does not exist; pass an experiments/*.py file")
    args.seeds = args.seeds if args.seeds is not None else "0,1,2" if args.tune else "0,1"
    try:
        args.worker_list = [int(x) for x in args.workers.split(",") if x]
        args.seed_list = [int(x) for x in args.seeds.split(",") if x]
    except ValueError:
        ap.error(f"--workers={args.workers!r} and --seeds={args.seeds!r} must be comma-separated integers")
    if not args.worker_list or min(args.worker_list) < 1 or not args.seed_list:
        ap.error("--workers needs positive integers and --seeds at least one seed")
    wanted = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in labels()]
    if unknown:
        ap.error(f"unknown strategy label {unknown[0]!r}; use --list to see them")
    args.entries = [e for e in entries() if not wanted or e.label in wanted]
    bad = [o for o in args.override if "=" not in o]
    if bad:
        ap.error(f"--override {bad[0]!r} must look like num_epochs=10")
    tune.check_flags(ap, args)
    return args


def run_overrides(args) -> list[str]:
    """The ``--config.*`` overrides every run of the comparison gets (before tuning and its setting's own):
    an evaluation every epoch, ``--override`` and ``--num_epochs``."""
    extra = ["--config.eval_every_epochs=1", *[f"--config.{o}" for o in args.override]]
    if args.num_epochs:
        extra.append(f"--config.num_epochs={args.num_epochs}")
    return extra


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) every run, then write compare.csv, compare.md and the figures."""
    cli.require_train_extra("lbsgd.compare")  # the configs and the runs need lbsgd[train]
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.list:
        print("\n".join(labels()))
        return 0
    extra = run_overrides(args)
    if args.tune:  # each setting's rate and momentum, chosen on held-out training data first (lbsgd.tune)
        extra, status = tune.tune(args, extra, runs.child_env(args.cpu_devices))
        if status is not None:
            return status
    plan = [(k, seed, e) for seed in args.seed_list for k in args.worker_list for e in args.entries]  # seed-major
    planned = {(k, s, e): (run_dir(args.workdir, e, k, s), runs.setting_args(e, k, s, extra)) for k, s, e in plan}
    asked, status = runs.plan_runs("lbsgd.compare", args.config, planned)
    if asked is None:
        return status
    os.makedirs(args.workdir, exist_ok=True)
    env = runs.child_env(args.cpu_devices)
    progress = runs.Progress(len(plan), sum(not runs.is_done(run_dir(args.workdir, e, k, s)) for k, s, e in plan))
    rows, histories, failures, configs = [], {}, [], {}
    try:
        for i, (k, seed, entry) in enumerate(plan, 1):
            t_run = time.time()
            path = run_dir(args.workdir, entry, k, seed)
            cached = runs.is_done(path, asked[k, seed, entry])
            try:
                results = run_one(args.config, args.workdir, entry, k, seed, extra, env, asked[k, seed, entry])
            except runs.RunFailed as e:
                failures.append(str(e))
                print(f"[{i}/{len(plan)}] {e}", flush=True)
                continue
            rows.append({"label": entry.label, "seed": seed, "run": path, **results})
            configs[path] = asked[k, seed, entry]
            histories[path] = runs.history(path)
            what = f"{entry.label}, k={k}, seed {seed}"
            accuracy = f"test accuracy {100 * results['eval_accuracy']:.2f} %"
            print(progress.line(i, what, accuracy, time.time() - t_run, cached), flush=True)
    except (KeyboardInterrupt, runs.RunStopped):
        return runs.stopped("lbsgd.compare", len(rows), len(plan))
    except StaleRun as e:  # a folder changed under the comparison since the check above
        print(f"lbsgd.compare: error: {e}", file=sys.stderr)
        return e.exit_code
    # Time model: compute per worker and step from the allreduce run with the same k (or --compute_ms).
    for row in rows:
        k = row["num_workers"]
        if args.compute_ms:
            compute_s = args.compute_ms / 1000
        else:
            base = [r for r in rows if r["label"] == "allreduce" and r["num_workers"] == k]
            ref = base[0] if base else row
            compute_s = row["per_worker_batch_size"] / max(ref["images_per_second"], 1e-9)
        strategy = strategy_of(configs[row["run"]], row["devices"])
        row["compute_s_per_step"] = compute_s
        for key, seconds in modelled_times(strategy, row, compute_s).items():
            row[f"step_s {key}"] = seconds
            row[f"total_s {key}"] = seconds * row["steps"]
        row.update(straggler_report.step_columns(args, row, compute_s, lambda c: modelled_times(strategy, row, c)))  # noqa: B023
    straggler_report.annotate_targets(args, rows, histories)
    tune.annotate(args, rows)  # with --tune: the chosen values of each row's setting
    if rows:
        runs.write_csv(os.path.join(args.workdir, "compare.csv"), rows)
        with open(os.path.join(args.workdir, "compare.md"), "w") as f:
            f.write(summary_table(rows, args.worker_list) + tune.table(args, rows)
                    + straggler_report.table(args, rows, args.worker_list, labels(), time_panels()))
        for p in plot(args.workdir, rows, histories, args.worker_list,
                      configs[rows[0]["run"]].get("dataset", "") if rows else ""):
            print(f"wrote {p}")
        print(f"wrote {os.path.join(args.workdir, 'compare.csv')} and compare.md ({len(rows)} runs, "
              f"{progress.minutes:.1f} min)")
    return runs.exit_status("lbsgd.compare", failures)


if __name__ == "__main__":
    sys.exit(main())
