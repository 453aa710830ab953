"""lbsgd.compare (issue #10): the per-strategy time model against hand values, in the strategies and in every row
compare writes; one comparison's runs, rows and table against the runs' own records; reruns: the same flags reuse every
run, other flags are refused before anything starts; bad flags."""

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import types

import numpy as np
import pytest

from conftest import REPO, file_stamps, forked_launch, main_here, read_csv, read_json, run_module
from lbsgd import checkpoint, commcost, compare, runs, strategies


def test_time_model_of_every_strategy_by_hand():
    k, model, compute = 8, 1e8, 0.1  # 100 MB model, 100 ms of compute per step
    alpha, beta = 50e-6, 8 / 10e9  # 10 GbE
    msg = alpha + model * beta  # one message: 0.08005 s
    ring = 2 * (k - 1) * alpha + 2 * (k - 1) / k * model * beta  # 0.1407 s
    assert msg == pytest.approx(0.08005)
    assert ring == pytest.approx(0.1407)
    cases = [  # (strategy, k, hand value)
        (strategies.Allreduce(), k, compute + ring),
        (strategies.Allreduce(aggregation="halving_doubling"), k, compute + 2 * 3 * alpha + 2 * 7 / 8 * model * beta),
        (strategies.DPSGD(topology="ring", num_workers=k), k, max(compute, 2 * msg)),  # awc overlaps
        (strategies.DPSGD(topology="ring", form="atc", num_workers=k), k, compute + 2 * msg),
        (strategies.DPSGD(topology="exponential", form="atc", num_workers=k), k, compute + 3 * msg),
        (strategies.DPSGD(topology="one_peer_exponential", num_workers=k), k, max(compute, msg)),
        (strategies.GossipPull(num_workers=k), k, compute + msg),
        (strategies.GossipPush(num_workers=k), k, compute + alpha + (model + 4) * beta),
        (strategies.EASGD(period=10, num_workers=k), k, compute + ring / 10),
        (strategies.AsyncPS(staleness=7, num_workers=k), k, max(compute + msg * (1 + 1 / 8), k * msg * (1 + 1 / 8))),
        (strategies.AsyncPS(staleness=0, num_workers=1), 1, compute + 2 * msg),  # one worker: its own cycle
    ]
    for strategy, workers, want in cases:
        assert strategy.step_time(compute, workers, model, alpha, beta) == pytest.approx(want), strategy
    assert commcost.model_params(*commcost.NETWORKS["10GbE"], 0.0)[:2] == pytest.approx((alpha, beta))


# The tiny run every comparison test trains (resnet4, width 8, n = 4, 3 steps), as the values each run must record.
TINY = {"model": "resnet4", "model_width": 8, "per_worker_batch_size": 4, "max_steps": 3, "checkpoint_every_steps": 3}
SEEDS = (0, 1)
# The two strategy settings the runs compare, written out by hand: (label, folder of k = 8, the fields they set).
ENTRIES = [("allreduce", "allreduce_k8", {"strategy": "allreduce"}),
           ("easgd tau=10", "easgd_tau_10_k8", {"strategy": "easgd", "easgd.period": 10})]
RESNET50_BYTES = 4 * 25_557_032  # float32 ResNet-50 (tests/test_models.py counts its parameters)


def _args(workdir, data_dir, num_epochs=1, **changed):
    """lbsgd.compare's flags for ENTRIES x SEEDS at k = 8 with the TINY overrides (``changed``: other values)."""
    overrides = {"data_dir": data_dir, **TINY, **changed}
    return ["--config=experiments/digits.py", f"--workdir={workdir}", "--workers=8",
            f"--seeds={','.join(map(str, SEEDS))}", f"--strategies={','.join(label for label, _, _ in ENTRIES)}",
            f"--num_epochs={num_epochs}", *[a for f, v in overrides.items() for a in ("--override", f"{f}={v}")]]


def _main_captured(module, args):
    """``module.main(args)`` with its standard output and error captured (for module-scoped fixtures, no capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.main(args)
    return subprocess.CompletedProcess([module.__name__, *args], code, out.getvalue(), err.getvalue())


def _networks():
    """(α, β) of the comparison's two networks, by hand: 10 GbE with 50 µs, 56 Gb/s InfiniBand with 5 µs."""
    return {"10GbE": (50e-6, 8 / 10e9), "IB56": (5e-6, 8 / 56e9)}


def _hand_step_s(label, k, compute, nbytes, alpha, beta):
    """A strategy's modelled seconds per step, by hand (α-β model): compute plus its communication."""
    message = alpha + nbytes * beta  # one point-to-point message of the model
    ring = 2 * (k - 1) * alpha + 2 * (k - 1) / k * nbytes * beta  # ring allreduce: 2(k-1) steps of b/k bytes
    degree = {"ring": 2, "exponential": math.log2(k), "complete": k - 1, "one-peer-exp": 1}
    if label == "allreduce":  # config.aggregation 'psum', modelled as a ring
        return compute + ring
    if label.startswith("dpsgd "):  # awc: the out-degree messages overlap the compute
        return max(compute, degree[label.split()[1]] * message)
    if label == "gossip pull":
        return compute + message
    if label.startswith("gossip push"):  # the model and its push-sum weight (4 bytes)
        return compute + alpha + (nbytes + 4) * beta
    if label.startswith("easgd tau="):
        return compute + ring / int(label.split("=")[1])
    if label == "async_ps tau=k-1":  # staleness k-1: a pull every k steps; the server's one link carries all k pushes
        pulls = 1 / k
        return max(compute + message * (1 + pulls), k * message * (1 + pulls))
    raise AssertionError(f"no hand value for {label!r}")


def _check_time_model(row, compute, k=8):
    """Every step_s / total_s column of a compare.csv row against the hand values, for the compute time given."""
    assert float(row["compute_s_per_step"]) == pytest.approx(compute, rel=1e-12)
    for net, (alpha, beta) in _networks().items():
        for size, nbytes in (("as-is", 4 * int(row["num_params"])), ("ResNet-50", RESNET50_BYTES)):
            want = _hand_step_s(row["label"], k, compute, nbytes, alpha, beta)
            assert float(row[f"step_s {net} {size}"]) == pytest.approx(want, rel=1e-9), (row["label"], net, size)
            assert float(row[f"total_s {net} {size}"]) == pytest.approx(want * int(row["steps"]), rel=1e-9)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, data_dir):
    """One comparison of ENTRIES x SEEDS at k = 8 (4 tiny runs, the real lbsgd.main forked), shared by the tests
    below: they check its outputs, and rerun it on copies of its folder."""
    workdir = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        mp.setattr(runs, "launch_main", forked_launch)  # the real lbsgd.main, forked (test_sweep.py: unforked)
        proc = _main_captured(compare, _args(workdir, data_dir))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = {(label, s): read_json(workdir / f"{folder}_seed{s}" / "results.json") for label, folder, _ in ENTRIES
               for s in SEEDS}
    return types.SimpleNamespace(workdir=workdir, proc=proc, results=results)


def test_every_run_records_its_strategy_and_seed(compared, data_dir):
    lines = [ln for ln in compared.proc.stdout.splitlines() if ln.startswith("[")]
    order = [(s, label) for s in SEEDS for label, _, _ in ENTRIES]  # seed-major
    assert [ln.split(": test accuracy")[0] for ln in lines] == [
        f"[{i}/4] {label}, k=8, seed {s}" for i, (s, label) in enumerate(order, 1)]
    for label, folder, fields in ENTRIES:
        for s in SEEDS:
            config = runs.load_config(os.path.join(REPO, "experiments", "digits.py"))  # the run's config, by hand
            for field, value in {"data_dir": data_dir, **TINY, "num_workers": 8, "seed": s, "eval_every_epochs": 1,
                                 "num_epochs": 1, **fields}.items():
                *parents, leaf = field.split(".")
                setattr(config[parents[0]] if parents else config, leaf, value)
            recorded = read_json(compared.workdir / f"{folder}_seed{s}" / "config.json")
            assert recorded["seed"] == s and recorded == checkpoint._plain(config), (label, s)
        # two seeds, two runs: other initial parameters and data order, so another training loss
        assert compared.results[label, 0]["train_loss"] != compared.results[label, 1]["train_loss"], label


def test_compare_csv_is_the_runs_results_and_their_modelled_times(compared):
    rows = read_csv(compared.workdir / "compare.csv")
    order = [(label, folder, s) for s in SEEDS for label, folder, _ in ENTRIES]  # seed-major, as run
    assert [(r["label"], r["seed"]) for r in rows] == [(label, str(s)) for label, _, s in order]
    for r, (label, folder, s) in zip(rows, order):
        res = compared.results[label, s]
        assert r["run"] == str(compared.workdir / f"{folder}_seed{s}")
        assert {k: r[k] for k in res} == {k: "" if v is None else str(v) for k, v in res.items()}  # every field, as is
    assert rows[1]["strategy"] == "easgd" and rows[1]["period"] == "10"
    assert float(rows[1]["bytes_sent_per_worker_per_step"]) == pytest.approx(
        float(rows[0]["bytes_sent_per_worker_per_step"]) / 10)  # one allreduce every 10 steps
    # Compute per worker and step: n examples at the images/s of the (first) allreduce run with the same k.
    compute = 4 / compared.results["allreduce", 0]["images_per_second"]
    for r in rows:
        _check_time_model(r, compute)


def test_compare_md_is_the_mean_over_seeds_of_each_strategy(compared):
    lines = [ln for ln in (compared.workdir / "compare.md").read_text().splitlines() if ln.startswith("|")]
    table = [[c.strip() for c in ln.strip("|").split("|")] for i, ln in enumerate(lines) if i != 1]
    header, *body = table
    assert header[:4] == ["strategy", "k", "seeds", "test accuracy (%)"] and len(body) == len(ENTRIES)
    rows = {r["label"]: r for r in read_csv(compared.workdir / "compare.csv") if r["seed"] == "0"}
    for line, (label, _, _) in zip(body, ENTRIES):
        res = [compared.results[label, s] for s in SEEDS]
        acc = [100 * r["eval_accuracy"] for r in res]
        step = {key: float(rows[label][f"step_s {key}"]) for key in ("10GbE as-is", "10GbE ResNet-50", "IB56 as-is",
                                                                      "IB56 ResNet-50")}
        assert line == [
            label, "8", "2", f"{np.mean(acc):.2f} ± {np.std(acc, ddof=1):.2f}",
            f"{np.mean([r['consensus_distance'] for r in res]):.2g}",
            f"{res[0]['bytes_sent_per_worker_per_step'] / 1e6:.2f}",
            f"{np.mean([r['images_per_second'] for r in res]):,.0f}",
            f"{step['10GbE as-is']:.4f} / {step['10GbE ResNet-50']:.3f}",
            f"{step['IB56 as-is']:.4f} / {step['IB56 ResNet-50']:.3f}",
        ]
    for name in ("compare_epochs.png", "compare_time_k8.png"):
        path = compared.workdir / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000, name


def test_compare_csv_models_every_strategy_s_step_time_by_hand(tmp_path, capsys, monkeypatch):
    """Every built-in setting at k = 8, its runs stood in for by results.json files (no training): each row's
    step_s / total_s columns are the strategy's own α-β formula at the compute time of the allreduce run."""
    ips = {}

    def fake_launch(argv, log_path, env):
        workdir = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
        ips[workdir] = 1000.0 + 37 * len(ips)  # every run its own throughput
        results = {"eval_accuracy": 0.5, "num_workers": 8, "per_worker_batch_size": 16, "steps": 11, "devices": 8,
                   "num_params": 78_000, "images_per_second": ips[workdir], "consensus_distance": 0.0,
                   "bytes_sent_per_worker_per_step": 1.0}
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f)
        with open(os.path.join(workdir, "eval_history.jsonl"), "w") as f:
            f.write(json.dumps({"step": 11, "epoch": 1.0, "eval_accuracy": 0.5}) + "\n")
        return 0, ""

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(runs, "launch_main", fake_launch)
    built_in = ["allreduce", "dpsgd ring", "dpsgd exponential", "dpsgd complete", "dpsgd one-peer-exp", "gossip pull",
                "gossip push", "gossip push one-peer-exp", "easgd tau=1", "easgd tau=10", "async_ps tau=k-1"]
    assert set(built_in) <= set(compare.labels())
    done = main_here(compare, ["--config=experiments/digits.py", f"--workdir={tmp_path}", "--workers=8", "--seeds=0",
                               f"--strategies={','.join(built_in)}"], capsys)
    assert done.returncode == 0, done.stderr
    rows = read_csv(tmp_path / "compare.csv")
    assert [r["label"] for r in rows] == built_in
    compute = 16 / ips[str(tmp_path / "allreduce_k8_seed0")]
    for r in rows:
        _check_time_model(r, compute)


def _copy(compared, tmp_path):
    """A copy of the comparison's folder to rerun on (the shared one stays as the fixture left it)."""
    return shutil.copytree(compared.workdir, tmp_path / "compare")




def test_rerun_with_the_same_flags_reuses_every_run(compared, tmp_path, data_dir, capsys, no_launch):
    workdir = _copy(compared, tmp_path)
    kept = {p: t for p, t in file_stamps(workdir).items() if p.suffix not in (".csv", ".md", ".png")}
    again = main_here(compare, _args(workdir, data_dir), capsys)
    assert again.returncode == 0 and not no_launch and not again.stderr, again.stderr
    assert again.stdout.count("already done") == 4
    assert {p: t for p, t in file_stamps(workdir).items() if p.suffix not in (".csv", ".md", ".png")} == kept
    strip = lambda rows: [{k: v for k, v in r.items() if k != "run"} for r in rows]  # noqa: E731
    assert strip(read_csv(workdir / "compare.csv")) == strip(read_csv(compared.workdir / "compare.csv"))


@pytest.mark.parametrize("num_epochs,changed,fields", [
    (2, {}, "num_epochs 1 -> 2"),
    (1, {"model_width": 16}, "model_width 8 -> 16"),
])
def test_rerun_with_other_flags_is_refused_before_anything_starts(compared, tmp_path, data_dir, capsys, no_launch,
                                                                  num_epochs, changed, fields):
    workdir = _copy(compared, tmp_path)
    stamps = file_stamps(workdir)
    proc = main_here(compare, _args(workdir, data_dir, num_epochs, **changed), capsys)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == (f"lbsgd.compare: error: {workdir}/allreduce_k8_seed0 holds a run of another config: {fields} "
                        f"(recorded -> asked); use a new --workdir, or delete that folder to run it again; 3 more run "
                        f"folder(s) here hold other runs too")
    assert not no_launch and not proc.stdout and file_stamps(workdir) == stamps  # nothing started or written


@pytest.mark.parametrize(
    "args,message",
    [
        (["--strategies=carrier_pigeon"], "unknown strategy label 'carrier_pigeon'"),
        (["--workers=8,x"], "comma-separated integers"),
        (["--config=experiments/nope.py"], "does not exist"),
        (["--override", "num_epochs"], "must look like"),
    ],
)
def test_compare_bad_flags_are_one_line(tmp_path, args, message):
    base = ["--config=experiments/digits.py", f"--workdir={tmp_path}"]
    base = [a for a in base if not any(a.split("=")[0] == b.split("=")[0] for b in args)]
    proc = run_module("lbsgd.compare", *base, *args, timeout=60)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
