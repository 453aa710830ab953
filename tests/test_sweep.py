"""lbsgd.sweep (issue #11): the grid, resume without rerunning, one CSV row per (cell, seed), bad grids."""

import csv
import json
import os

import pytest

from conftest import REPO, forked_launch, main_here, run_module
from lbsgd import runs, sweep


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


TINY = ["model=resnet4", "model_width=8", "per_worker_batch_size=4", "max_steps=3", "checkpoint_every_steps=3",
        "num_epochs=1", "log_every_steps=1", "num_devices=1"]


def test_sweep_writes_one_row_per_cell_and_seed_and_resumes_without_rerunning(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(runs, "launch_main", forked_launch)  # the real lbsgd.main, forked (launch_main: below)
    args = ["--config=experiments/digits.py", f"--workdir={tmp_path}", "--seeds=0,1", "--grid=num_workers=2,4",
            "--override", f"data_dir={data_dir}", *[a for o in TINY for a in ("--override", o)]]
    first = main_here(sweep, args, capsys)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "[1/4] num_workers=2, seed 0" in first.stdout and "[4/4] num_workers=4, seed 1" in first.stdout
    assert "ETA" in first.stdout
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["cell"], r["seed"]) for r in rows] == [("num_workers=2", "0"), ("num_workers=2", "1"),
                                                     ("num_workers=4", "0"), ("num_workers=4", "1")]
    for r in rows:  # every results.json field is a column, with the run's own value
        with open(os.path.join(r["run"], "results.json")) as f:
            res = json.load(f)
        assert int(r["global_batch_size"]) == 4 * int(r["set_num_workers"]) == res["global_batch_size"]
        assert float(r["eval_accuracy"]) == pytest.approx(res["eval_accuracy"]) and set(res) <= set(r)
        assert r["final_train_loss"] not in ("", None)
    md = (tmp_path / "sweep.md").read_text()
    assert md.count("| num_workers=") == 2 and " ± " in md
    pivot = (tmp_path / "sweep_by_kn.md").read_text().splitlines()
    assert [ln.split("|")[1].strip() for ln in pivot[2:]] == ["8", "16"]  # one row per kn, ascending
    for name in ("sweep_error_vs_kn.png", "sweep_train_curves.png", "sweep_train_vs_test.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name

    # An interrupted run (checkpoint, no results.json) resumes; finished runs are not rerun.
    finished = [tmp_path / "num_workers-2" / f"seed{s}" / "results.json" for s in (0, 1)] + [
        tmp_path / "num_workers-4" / "seed1" / "results.json"]
    stamps = [os.stat(p).st_mtime_ns for p in finished]
    interrupted = tmp_path / "num_workers-4" / "seed0"
    os.remove(interrupted / "results.json")
    second = main_here(sweep, args, capsys)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("already done") == 3
    assert [os.stat(p).st_mtime_ns for p in finished] == stamps
    assert "resumed from checkpoint at step 3" in (interrupted / "log.txt").read_text()
    with open(tmp_path / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_a_stopped_run_stops_the_sweep_with_a_line_to_resume(tmp_path, monkeypatch, capsys):
    """SIGINT/SIGTERM reach the running lbsgd.main too, which checkpoints and exits 130/143: the sweep
    then stops (no further cells) and says how to resume."""
    calls = []

    def fake_run(config, workdir, overrides, env, name):
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
