"""lbsgd.sweep (issue #11): the grid, bad grids; one sweep's runs, rows, tables and figures against the runs' own
records; reruns: the same flags reuse every run, other flags are refused before anything starts, an interrupted run
resumes."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import types

import numpy as np
import pytest

from conftest import REPO, file_stamps, forked_launch, main_here, read_csv, read_json, run_module
from lbsgd import checkpoint, runs, sweep


def _config():
    return runs.load_config(os.path.join(REPO, "experiments", "digits.py"))


def test_grid_is_the_product_of_its_axes_and_grids_add_up():
    cells = sweep.plan(["num_workers=1,2,4;warmup=gradual,none", "num_workers=4;warmup=none", "num_workers=4;optimizer=lars"],
                       _config())
    assert len(cells) == 3 * 2 + 1  # the second grid's cell is already in the first
    assert cells[0].overrides == (("num_workers", "1"), ("warmup", "gradual"))
    assert cells[1].label == "num_workers=1 warmup=none" and cells[1].variant == "warmup=none"
    assert cells[-1].args() == ["--config.num_workers=4", "--config.optimizer=lars"]
    assert cells[-1].name == "num_workers-4_optimizer-lars"
    nested = sweep.plan(["easgd.period=1,10;strategy=easgd"], _config())
    assert [c.name for c in nested] == ["easgd.period-1_strategy-easgd", "easgd.period-10_strategy-easgd"]


@pytest.mark.parametrize(
    "grid,message",
    [
        ("num_workers", "must look like field=value1,value2"),
        ("num_workers=", "needs a field and at least one value"),
        ("num_wrokers=1,2", "'num_wrokers' is not a config field"),
        ("num_workers=1,two", "not a int"),
        ("base_learning_rate=fast", "not a float"),
        ("noise_scale=maybe", "not a bool"),
        ("num_workers=1;num_workers=2", "names 'num_workers' twice"),
        ("seed=0,1", "use --seeds"),
        (";", "is empty"),
    ],
)
def test_bad_grid_is_one_line(tmp_path, grid, message):
    with pytest.raises(sweep.GridError, match=message):
        sweep.plan([grid], _config())
    proc = run_module("lbsgd.sweep", "--config=experiments/digits.py", f"--workdir={tmp_path}", f"--grid={grid}", timeout=60)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message.split("'")[0] in lines[0], proc.stderr
    assert not os.listdir(tmp_path)  # nothing ran


@pytest.mark.parametrize(
    "args,message",
    [([], "give at least one --grid"), (["--grid=num_workers=2", "--seeds=0,x"], "comma-separated integers"),
     (["--grid=num_workers=2", "--seeds=1,1"], "each once"), (["--grid=num_workers=2", "--override", "epochs"], "must look like")],
)
def test_bad_sweep_flags_are_one_line(tmp_path, args, message):
    proc = run_module("lbsgd.sweep", "--config=experiments/digits.py", f"--workdir={tmp_path}", *args, timeout=60)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


# The tiny run every sweep test trains (resnet4, width 8, 12 steps on one device; η = 2 per 256 so that cells and seeds
# end with different test errors), as the values each run must record.
TINY = {"model": "resnet4", "model_width": 8, "per_worker_batch_size": 4, "max_steps": 12, "checkpoint_every_steps": 12,
        "base_learning_rate": 2.0, "num_epochs": 1, "log_every_steps": 1, "num_devices": 1}
GRIDS = ["num_workers=2,4", "num_workers=2;momentum=0.5"]
SEEDS = (0, 1)
# The cells of GRIDS, written out by hand: (folder, label, variant, the fields the cell sets). Two kn (8, 16), two
# variants (the default recipe and momentum 0.5); the momentum-0.5 variant has kn = 8 only.
CELLS = [
    ("num_workers-2", "num_workers=2", "default", {"num_workers": 2}),
    ("num_workers-4", "num_workers=4", "default", {"num_workers": 4}),
    ("num_workers-2_momentum-0.5", "num_workers=2 momentum=0.5", "momentum=0.5", {"num_workers": 2, "momentum": 0.5}),
]


def _args(workdir, data_dir, grids=GRIDS, **changed):
    """lbsgd.sweep's flags for GRIDS x SEEDS with the TINY overrides (``changed``: other override values)."""
    overrides = {"data_dir": data_dir, **TINY, **changed}
    return ["--config=experiments/digits.py", f"--workdir={workdir}", f"--seeds={','.join(map(str, SEEDS))}",
            *[f"--grid={g}" for g in grids], *[a for f, v in overrides.items() for a in ("--override", f"{f}={v}")]]


def _expected_config(data_dir, fields, seed):
    """The config a run must record: the digits file's, with TINY, the data dir, the cell's fields and the seed set by
    hand (not through lbsgd.runs' parsing of the flags)."""
    config = _config()
    for field, value in {"data_dir": data_dir, **TINY, **fields, "seed": seed}.items():
        setattr(config, field, value)
    return checkpoint._plain(config)


def _table(path):
    """A markdown table's rows (header first) as lists of stripped cells, without the |---| line."""
    with open(path) as f:
        lines = [ln for ln in f.read().splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for i, ln in enumerate(lines) if i != 1]


def _mean_std(values, digits=2):
    """``m ± s`` (numpy, sample std) as the tables print it, or ``m`` for one value."""
    m = float(np.mean(values))
    return f"{m:.{digits}f} ± {float(np.std(values, ddof=1)):.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def _main_captured(module, args):
    """``module.main(args)`` with its standard output and error captured (for module-scoped fixtures, no capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.main(args)
    return subprocess.CompletedProcess([module.__name__, *args], code, out.getvalue(), err.getvalue())


def record_figures(mp):
    """Patch matplotlib's ``Figure.savefig`` (through ``mp``) to keep, per file name, what each axes' legend shows:
    a list per axes of ``(label, x, y)`` of its labelled lines (an errorbar's data line)."""
    import matplotlib.figure

    figures, save = {}, matplotlib.figure.Figure.savefig

    def savefig(fig, path, *args, **kwargs):
        panels = []
        for ax in fig.axes:
            handles, labels = ax.get_legend_handles_labels()
            lines = [h.lines[0] if hasattr(h, "lines") else h for h in handles]
            panels.append([(label, [float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()])
                           for label, line in zip(labels, lines)])
        figures[os.path.basename(str(path))] = panels
        return save(fig, path, *args, **kwargs)

    mp.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return figures


@pytest.fixture(scope="module")
def swept(tmp_path_factory, data_dir):
    """One sweep of GRIDS x SEEDS (6 tiny runs, the real lbsgd.main forked), shared by the tests below: they check
    its outputs, and rerun it on copies of its folder."""
    workdir = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        mp.setattr(runs, "launch_main", forked_launch)  # the real lbsgd.main, forked (launch_main: below)
        figures = record_figures(mp)
        proc = _main_captured(sweep, _args(workdir, data_dir))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = {(folder, s): read_json(workdir / folder / f"seed{s}" / "results.json")
               for folder, *_ in CELLS for s in SEEDS}
    return types.SimpleNamespace(workdir=workdir, proc=proc, figures=figures, results=results)


def _error(swept, folder, seeds=SEEDS):
    """Test errors (%) of a cell's runs, from their results.json."""
    return [100 * swept.results[folder, s]["eval_top1_error"] for s in seeds]


def _train_history(swept, folder, seed):
    return [json.loads(ln) for ln in open(swept.workdir / folder / f"seed{seed}" / "train_history.jsonl") if ln.strip()]


def test_every_run_records_the_config_and_seed_of_its_cell(swept, data_dir):
    lines = [ln for ln in swept.proc.stdout.splitlines() if ln.startswith("[")]
    expected = [f"[{i}/6] {label}, seed {s}:" for i, (s, (_, label, _, _)) in
                enumerate(((s, c) for s in SEEDS for c in CELLS), 1)]  # seed-major
    assert [ln.split(" test error")[0] for ln in lines] == expected, swept.proc.stdout
    assert all("ETA" in ln for ln in lines)
    for folder, _, _, fields in CELLS:
        for s in SEEDS:
            recorded = read_json(swept.workdir / folder / f"seed{s}" / "config.json")
            assert recorded["seed"] == s and recorded == _expected_config(data_dir, fields, s), (folder, s)
        # two seeds, two runs: other initial parameters and data order, so another training loss
        assert swept.results[folder, 0]["train_loss"] != swept.results[folder, 1]["train_loss"], folder


def test_sweep_csv_has_one_row_per_run_with_its_results(swept):
    rows = read_csv(swept.workdir / "sweep.csv")
    assert [(r["cell"], r["seed"], r["variant"]) for r in rows] == [
        (label, str(s), variant) for _, label, variant, _ in CELLS for s in SEEDS]
    for r, (folder, s) in zip(rows, [(c[0], s) for c in CELLS for s in SEEDS]):
        assert r["run"] == str(swept.workdir / folder / f"seed{s}")
        fields = next(c[3] for c in CELLS if c[0] == folder)
        assert {k[4:]: v for k, v in r.items() if k.startswith("set_") and v} == {f: str(v) for f, v in fields.items()}
        res = swept.results[folder, s]
        assert {k: r[k] for k in res} == {k: "" if v is None else str(v) for k, v in res.items()}  # every field, as is
        assert int(r["global_batch_size"]) == 4 * fields["num_workers"]
        last = _train_history(swept, folder, s)[-1]
        assert float(r["final_train_loss"]) == last["train_loss"]
        assert float(r["final_train_error"]) == pytest.approx(1 - last["train_accuracy"], abs=1e-12)


def test_sweep_md_is_the_mean_over_seeds_of_each_cell(swept):
    header, *lines = _table(swept.workdir / "sweep.md")
    assert header[:4] == ["cell", "kn", "seeds", "test error (%)"] and header[6:8] == ["peak lr", "steps"]
    assert [ln[0] for ln in lines] == [label for _, label, _, _ in CELLS]
    for ln, (folder, _, _, fields) in zip(lines, CELLS):
        first = swept.results[folder, 0]
        assert ln[1] == str(4 * fields["num_workers"]) == str(first["global_batch_size"]) and ln[2] == "2"
        assert ln[3] == _mean_std(_error(swept, folder))
        last = [_train_history(swept, folder, s)[-1] for s in SEEDS]
        assert ln[4] == _mean_std([100 * (1 - h["train_accuracy"]) for h in last])
        assert ln[5] == _mean_std([h["train_loss"] for h in last], 3)
        assert ln[6] == f"{first['peak_learning_rate']:.4g}" and ln[7] == str(first["steps"])


def test_sweep_by_kn_groups_runs_by_kn_and_variant(swept):
    """Rows kn = 8, 16; columns the variants of the grid (the default recipe, momentum 0.5), each entry the mean over
    seeds of exactly that (kn, variant)'s runs."""
    table = _table(swept.workdir / "sweep_by_kn.md")
    steps = {kn: swept.results[folder, 0]["steps"] for kn, folder in ((8, "num_workers-2"), (16, "num_workers-4"))}
    assert table == [
        ["kn", "steps", "default", "momentum=0.5"],
        ["8", str(steps[8]), _mean_std(_error(swept, "num_workers-2")),
         _mean_std(_error(swept, "num_workers-2_momentum-0.5"))],
        ["16", str(steps[16]), _mean_std(_error(swept, "num_workers-4")), "–"],
    ]


def test_sweep_figures_draw_one_line_per_variant(swept):
    for name in ("sweep_error_vs_kn.png", "sweep_train_curves.png", "sweep_train_vs_test.png"):
        path = swept.workdir / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000, name
    mean = lambda folder: pytest.approx(float(np.mean(_error(swept, folder))))  # noqa: E731
    assert swept.figures["sweep_error_vs_kn.png"] == [[
        ("default", [8.0, 16.0], [mean("num_workers-2"), mean("num_workers-4")]),
        ("momentum=0.5", [8.0], [mean("num_workers-2_momentum-0.5")]),
    ]]
    (panel,) = swept.figures["sweep_train_vs_test.png"]
    assert [(label, x) for label, x, _ in panel] == [
        ("default: test", [8.0, 16.0]), ("default: train (last epoch)", [8.0, 16.0]),
        ("momentum=0.5: test", [8.0]), ("momentum=0.5: train (last epoch)", [8.0])]
    assert panel[0][2] == [mean("num_workers-2"), mean("num_workers-4")]
    assert panel[2][2] == [mean("num_workers-2_momentum-0.5")]
    # Figures 2-3: one panel (kn = 16) with the kn = 8 default curve dashed and the kn = 16 default run
    def curve(folder):  # the mean over seeds of a cell's training loss per epoch, from train_history.jsonl
        runs_ = [_train_history(swept, folder, s) for s in SEEDS]
        loss = np.mean([[h["train_loss"] for h in r] for r in runs_], axis=0)
        return [h["epoch"] for h in runs_[0]], pytest.approx(loss)

    assert swept.figures["sweep_train_curves.png"] == [[("kn = 8, default", *curve("num_workers-2")),
                                                        ("default", *curve("num_workers-4"))]]


def _copy(swept, tmp_path):
    """A copy of the sweep's folder to rerun on (the shared one stays as the fixture left it)."""
    return shutil.copytree(swept.workdir, tmp_path / "sweep")




def test_rerun_with_the_same_overrides_reuses_every_run(swept, tmp_path, data_dir, capsys, no_launch):
    workdir = _copy(swept, tmp_path)
    stamps = file_stamps(workdir)
    again = main_here(sweep, _args(workdir, data_dir), capsys)
    assert again.returncode == 0 and not no_launch, again.stderr
    assert again.stdout.count("already done") == 6 and not again.stderr
    assert {p: t for p, t in file_stamps(workdir).items() if p.suffix not in (".csv", ".md", ".png")} == {
        p: t for p, t in stamps.items() if p.suffix not in (".csv", ".md", ".png")}
    strip = lambda rows: [{k: v for k, v in r.items() if k != "run"} for r in rows]  # noqa: E731
    assert strip(read_csv(workdir / "sweep.csv")) == strip(read_csv(swept.workdir / "sweep.csv"))


def _remove(workdir, name, folders=None):
    for p in workdir.rglob(name):
        if folders is None or p.parent.relative_to(workdir).as_posix() in folders:
            p.unlink()


def _edit_label_smoothing(workdir):
    path = workdir / "num_workers-2_momentum-0.5" / "seed1" / "config.json"
    config = read_json(path)
    config["label_smoothing"] = 0.1  # as if another run had been made there
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "prepare,grids,changed,message",
    [
        # finished runs of other overrides (the issue: ResNet-4 results reported as another model's)
        (None, GRIDS, {"model_width": 16, "num_epochs": 2},
         ("num_workers-2/seed0 holds a run of another config: model_width 8 -> 16, num_epochs 1 -> 2 (recorded -> "
          "asked); use a new --workdir, or delete that folder to run it again; 5 more run folder(s) here hold other "
          "runs too")),
        # interrupted runs (checkpoints and config.json, no results.json) are not resumed with other values either
        (lambda w: _remove(w, "results.json"), GRIDS, {"num_epochs": 2},
         "num_workers-2/seed0 holds a run of another config: num_epochs 1 -> 2 (recorded -> asked); use a new"),
        # every folder is checked before anything starts: a new cell first, the last run of another config
        (_edit_label_smoothing, ["num_workers=1", *GRIDS], {},
         ("num_workers-2_momentum-0.5/seed1 holds a run of another config: label_smoothing 0.1 -> 0.0 (recorded -> "
          "asked); use a new --workdir, or delete that folder to run it again")),
        # a finished run without config.json (an older run) cannot be checked
        (lambda w: _remove(w, "config.json", ["num_workers-4/seed1"]), GRIDS, {},
         "num_workers-4/seed1 holds a run without a config.json (an older run), which cannot be checked"),
    ],
    ids=["other-overrides", "interrupted-other-overrides", "checked-up-front", "no-config-json"],
)
def test_a_run_folder_of_another_config_is_refused_before_anything_starts(swept, tmp_path, data_dir, capsys, no_launch,
                                                                          prepare, grids, changed, message):
    workdir = _copy(swept, tmp_path)
    if prepare:
        prepare(workdir)
    stamps = file_stamps(workdir)
    proc = main_here(sweep, _args(workdir, data_dir, grids, **changed), capsys)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("lbsgd.sweep: error: "), proc.stderr
    assert f"{workdir}/{message}" in lines[0], lines[0]
    assert not no_launch and not proc.stdout  # nothing started, no progress line
    assert file_stamps(workdir) == stamps and not (workdir / "num_workers-1").exists()  # nothing written


def test_an_unknown_override_is_one_line_before_anything_starts(tmp_path, data_dir, capsys, no_launch):
    proc = main_here(sweep, [*_args(tmp_path / "new", data_dir), "--override", "no_such_field=1"], capsys)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "unknown config field 'no_such_field'" in lines[0], proc.stderr
    assert not no_launch and not (tmp_path / "new").exists()


def test_an_interrupted_run_resumes_and_finished_runs_are_not_rerun(swept, tmp_path, data_dir, capsys, monkeypatch):
    workdir = _copy(swept, tmp_path)
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(runs, "launch_main", forked_launch)
    interrupted = workdir / "num_workers-4" / "seed0"
    os.remove(interrupted / "results.json")  # a run stopped after its last checkpoint
    finished = [p for p in workdir.rglob("results.json")]
    stamps = [p.stat().st_mtime_ns for p in finished]
    second = main_here(sweep, _args(workdir, data_dir), capsys)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("already done") == 5 and "[2/6] num_workers=4, seed 0" in second.stdout
    assert [p.stat().st_mtime_ns for p in finished] == stamps
    assert f"resumed from checkpoint at step {TINY['max_steps']}" in (interrupted / "log.txt").read_text()
    resumed = read_json(interrupted / "results.json")
    assert resumed["eval_accuracy"] == swept.results["num_workers-4", 0]["eval_accuracy"]
    assert len(read_csv(workdir / "sweep.csv")) == 6


def test_a_stopped_run_stops_the_sweep_with_a_line_to_resume(tmp_path, monkeypatch, capsys):
    """SIGINT/SIGTERM reach the running lbsgd.main too, which checkpoints and exits 130/143: the sweep
    then stops (no further cells) and says how to resume."""
    calls = []

    def fake_run(config, workdir, overrides, env, name, asked=None):
        calls.append(name)
        raise runs.RunStopped(f"{name} was stopped")

    monkeypatch.setattr(runs, "run_main", fake_run)
    code = sweep.main(["--config=experiments/digits.py", f"--workdir={tmp_path}", "--seeds=0", "--grid=num_workers=2,4"])
    assert code == 130 and calls == ["num_workers=2, seed 0"]
    assert "stopped after 0 of 2 runs; rerun the same command to resume" in capsys.readouterr().err


def test_launch_main_runs_lbsgd_main_and_appends_its_output_to_the_log(tmp_path, monkeypatch):
    """The sweep's and the comparison's one way to start a run (their tests above fork it instead): a
    subprocess whose exit status and standard error come back, its standard output, then error, appended to
    the log."""
    monkeypatch.chdir(REPO)
    log = tmp_path / "log.txt"
    log.write_text("earlier run\n")
    code, err = runs.launch_main(["--config=experiments/nope.py", f"--workdir={tmp_path}"], str(log), dict(os.environ))
    assert code == 2 and err.startswith("lbsgd: error: --config file") and "nope.py" in err, err
    assert log.read_text() == "earlier run\n" + err  # appended to (nothing on standard output), not truncated
    code, err = runs.launch_main(["--helpshort"], str(log), dict(os.environ))  # absl: help on stdout, status 1
    assert code == 1 and log.read_text().startswith("earlier run\n") and "--workdir" in log.read_text()
