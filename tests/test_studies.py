"""The recorded study scripts (benchmarks/*/run.sh) still ask for runs this code accepts.

Each script is run with ``PYTHON`` set to a stand-in that only records its arguments; every recorded
``-m lbsgd.sweep`` / ``-m lbsgd.compare`` call is then parsed by the tool's own flag parser (grids, strategy
labels, tuning grid) and each of its runs' configs is resolved as ``lbsgd.main`` would resolve it (unknown
fields, malformed values and impossible dataset splits are refused there). Nothing is trained.
"""

import glob
import json
import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "benchmarks", "*", "run.sh")))
RECORDER = """#!{python}
import json, sys
with open({log!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:2] == ["-c"]:  # a value a script reads back from a tool's output (the digits noise scale)
    print(512)
"""


def recorded_calls(script, tmp_path):
    """The argument lists the script passes to $PYTHON, in order."""
    log = str(tmp_path / "calls.jsonl")
    fake = tmp_path / "python"
    fake.write_text(RECORDER.format(python=sys.executable, log=log))
    fake.chmod(0o755)
    proc = subprocess.run(["sh", script, str(tmp_path / "w")], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=str(fake)), timeout=60)
    calls = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    return proc, calls


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: os.path.relpath(p, REPO))
def test_study_script_asks_for_valid_runs(script, tmp_path):
    from lbsgd import compare, runs, sweep

    proc, calls = recorded_calls(script, tmp_path)
    assert proc.returncode == 0, proc.stderr
    tools = [c for c in calls if c[:1] == ["-m"]]
    assert tools, f"{script} calls no lbsgd tool: {proc.stderr}"
    for call in calls:  # anything else it runs is a script of the repository (a summary of the runs)
        if call[:1] != ["-m"] and call[:1] != ["-c"]:
            assert os.path.isfile(os.path.join(REPO, call[0])), f"{script} runs a missing file: {shlex.join(call)}"
    checked = 0
    for call in tools:
        module, argv = call[1], call[2:]
        if module == "lbsgd.sweep":
            args = sweep.parse(argv)  # exits 2 on a bad grid, field or value
            for cell in args.cells:
                runs.resolve_config(args.config, sweep.run_overrides(args, cell, args.seed_list[0]))
                checked += 1
        elif module == "lbsgd.compare":
            args = compare.parse(argv)  # exits 2 on an unknown label, a bad tuning grid or bad flags
            extra = compare.run_overrides(args)
            for k in args.worker_list:
                for entry in args.entries:
                    runs.resolve_config(args.config, runs.setting_args(entry, k, args.seed_list[0], extra))
                    checked += 1
        else:
            pytest.fail(f"{script} calls an unexpected module {module}: {shlex.join(call)}")
    assert checked > 0


def test_jin_summary_picks_the_fastest_and_keeps_the_simulated_server_apart(tmp_path):
    """The study summary (benchmarks/jin_mnist1d/summarize.py) on hand-made comparisons: the time to a target
    is the first evaluated step at or below it times the modelled seconds per step; the fastest strategy at
    each p and CV is the one with the least such time; the server trained on simulated pulls (a ps_sim*
    comparison) is a row of its own."""
    import csv
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("summarize", os.path.join(REPO, "benchmarks", "jin_mnist1d", "summarize.py"))
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)

    def row(folder, label, errors, step_s):  # errors: test error (%) after steps 10, 20, 30; step_s: per CV
        run = tmp_path / folder / label.replace(" ", "_")
        os.makedirs(run)
        with open(run / "eval_history.jsonl", "w") as f:
            for step, err in zip((10, 20, 30), errors):
                f.write(json.dumps({"step": step, "eval_accuracy": 1 - err / 100}) + "\n")
        out = {"label": label, "num_workers": 8, "eval_accuracy": 1 - errors[-1] / 100, "tuned_momentum": 0.9,
               "run": str(run)}
        out.update({f"step_s {cv} {panel}": t for cv, t in step_s.items() for panel in summarize.PANELS})
        return out

    def write(folder, rows):
        fields = sorted({f for r in rows for f in r})
        with open(tmp_path / folder / "compare.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    write("p8", [row("p8", "allreduce", (20, 8, 4), {"cv=0": 1.0, "cv=0.1": 1.2, "cv=0.5": 3.0}),
                 row("p8", "async_ps tau=k-1", (30, 9, 6), {"cv=0": 0.4, "cv=0.1": 0.5, "cv=0.5": 0.5})])
    write("ps_sim_p8", [row("ps_sim_p8", "async_ps tau=k-1", (9, 7, 7), {"cv=0": 0.4, "cv=0.1": 0.4, "cv=0.5": 0.2})])
    rows = summarize.load(str(tmp_path))
    assert sorted(r["label"] for r in rows) == ["allreduce", "async_ps simulated", "async_ps tau=k-1"]
    summarize.add_targets(rows, [10.0, 5.0])
    text = summarize.summary(rows, [10.0, 5.0])
    fastest = [line for line in text.splitlines() if line.startswith("| cv=")]
    # 10 %: allreduce at step 20, the fixed server at 20, the simulated one at 10.
    assert fastest[0].startswith("| cv=0 | async_ps simulated (4; PS 4, AR 20)")
    assert fastest[1].startswith("| cv=0.1 | async_ps simulated (4; PS 4, AR 24)")
    assert fastest[2].startswith("| cv=0.5 | async_ps simulated (2; PS 2, AR 60)")
    # 5 %: only allreduce gets there (step 30).
    five = fastest[3 * len(summarize.PANELS):][:3]
    assert five[0].startswith("| cv=0 | allreduce (30; PS —, AR 30)") and five[2].startswith("| cv=0.5 | allreduce (90;")
    assert summarize.main([str(tmp_path), "--targets=10"]) == 0 and os.path.getsize(tmp_path / "time_to_target.png") > 0
