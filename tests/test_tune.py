"""lbsgd.compare --tune and the held-out validation split it tunes on (lbsgd.tune, lbsgd.data.holdout): the split
is disjoint from training, fixed, and the test split is never read; a tuned comparison chooses the same values when the
test labels are poisoned; a rerun trains nothing; bad flags are one line."""

import math

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, file_stamps, forked_launch, main_here, read_csv, read_json, tiny_config

from lbsgd import compare, runs, tune
from lbsgd.data import digits, holdout, pipeline, sources
from lbsgd.trainer import setup


def _dataset(num_train=50, num_test=7):
    """A dataset whose training labels are the example indices, and whose test split records every read."""
    png = tf.io.encode_png(np.zeros((8, 8, 1), np.uint8)).numpy()
    reads = []

    def spy(i):
        reads.append(i)
        return tf.constant(png), tf.constant(0, tf.int64)

    train = sources.in_memory_split([png] * num_train, np.arange(num_train))
    test = sources.Split(num_examples=num_test, read=spy)
    return sources.Dataset("fake", train, test, num_train, 1, (0.5,), (0.25,)), reads


def test_the_held_out_split_is_fixed_disjoint_and_the_test_split_is_never_read(monkeypatch):
    train, validation = holdout.held_out_indices(50, 0.2)
    assert len(validation) == 10 and not set(train) & set(validation)
    assert sorted([*train, *validation]) == list(range(50))
    dataset, reads = _dataset()
    monkeypatch.setattr(pipeline, "load", lambda name, data_dir: dataset)
    for seed in (0, 1):  # the run's seed does not move the held-out examples
        held = setup.load_dataset(tiny_config("unused", validation_fraction=0.2, seed=seed))
        assert (held.train.num_examples, held.eval.num_examples) == (40, 10)
        seen = np.concatenate([b["label"][b["mask"] > 0] for b in pipeline.eval_iterator(
            held, global_batch_size=4, first_slot=0, num_local_slots=4, augment="none", image_size=8)])
        assert sorted(seen) == list(validation)  # every validation example once, as the eval split
        batches = pipeline.train_iterator(held, num_workers=2, per_worker_batch_size=4, seed=seed, first_worker=0,
                                          num_local_workers=2, start_step=0, augment="none", image_size=8, num_steps=5)
        trained = np.concatenate([b["label"] for b in batches])  # one epoch: 40 // 8 = 5 steps
        assert sorted(trained) == list(train)  # training sees exactly the rest
    assert reads == []  # the test split's read was never even traced
    assert setup.load_dataset(tiny_config("unused")).eval is dataset.eval  # off by default: the test split


# One setting, a grid of two points, one k and one seed; the TINY runs of tests/test_compare.py.
TINY = {"model": "resnet4", "model_width": 8, "per_worker_batch_size": 4, "max_steps": 6, "checkpoint_every_steps": 6,
        "warmup": "none"}
GRID = "lr=0.25,2;momentum=0.9"


def _args(workdir, data_dir):
    return ["--config=experiments/digits.py", f"--workdir={workdir}", "--workers=8", "--seeds=0", "--num_epochs=1",
            "--strategies=allreduce", "--tune", f"--tune_grid={GRID}",
            *[a for f, v in {"data_dir": data_dir, **TINY}.items() for a in ("--override", f"{f}={v}")]]


def _poisoned_data_dir(path, monkeypatch):
    """The digits prepared in ``path`` with every test label wrong ((y + 1) mod 10); training examples as they are."""
    generate = digits.LbsgdDigits._generate_examples

    def split_generators(self, dl_manager):
        train, test = digits.split_indices()
        poisoned = ((key, {**ex, "label": (ex["label"] + 1) % 10}) for key, ex in generate(self, test))
        return {"train": generate(self, train), "test": poisoned}

    with monkeypatch.context() as mp:
        mp.setattr(digits.LbsgdDigits, "_split_generators", split_generators)
        digits.builder(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, data_dir):
    """A tuned comparison on the digits and the same on digits with poisoned test labels (3 tiny runs each)."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        mp.setattr(runs, "launch_main", forked_launch)
        dirs = {"clean": data_dir, "poisoned": _poisoned_data_dir(tmp_path_factory.mktemp("poisoned"), mp)}
        for name, path in dirs.items():
            workdir = tmp_path_factory.mktemp(name)
            code = compare.main(_args(workdir, path))
            assert code == 0, name
            out[name] = workdir, path
    return out


def test_tuning_never_reads_the_test_split(tuned):
    tables = {name: read_csv(workdir / "tune.csv") for name, (workdir, _) in tuned.items()}
    for name, rows in tables.items():
        assert [(r["lr_multiplier"], r["momentum_tried"]) for r in rows] == [("0.25", "0.9"), ("2.0", "0.9")]
        assert {r["eval_split"] for r in rows} == {"validation"} and {r["eval_examples"] for r in rows} == {"287"}
        # the best validation accuracy; a tie goes to the multiplier closest to 1
        best = min(rows, key=lambda r: (-float(r["eval_accuracy"]), abs(math.log2(float(r["lr_multiplier"])))))
        assert [r["chosen"] for r in rows] == [str(r is best) for r in rows], name
    # The poisoned test labels change nothing the choice sees: the same validation accuracies, the same choice ...
    assert [r["eval_accuracy"] for r in tables["clean"]] == [r["eval_accuracy"] for r in tables["poisoned"]]
    assert [r["chosen"] for r in tables["clean"]] == [r["chosen"] for r in tables["poisoned"]]
    final = {name: read_csv(workdir / "compare.csv")[0] for name, (workdir, _) in tuned.items()}
    assert final["clean"]["tuned_lr_multiplier"] == final["poisoned"]["tuned_lr_multiplier"]
    # ... while the tuned run on the test split does see them (so the poison was there to be read)
    assert {r["eval_split"] for r in final.values()} == {"test"}
    assert final["clean"]["eval_accuracy"] != final["poisoned"]["eval_accuracy"]
    chosen = next(r for r in tables["clean"] if r["chosen"] == "True")
    run = read_json(tuned["clean"][0] / "allreduce_k8_seed0" / "config.json")
    assert run["base_learning_rate"] == pytest.approx(0.4 * float(chosen["lr_multiplier"]))
    assert run["validation_fraction"] == 0.0 and run["momentum"] == 0.9
    md = (tuned["clean"][0] / "compare.md").read_text()
    assert "## Tuned learning rate and momentum" in md
    assert f"| allreduce | 8 | {float(chosen['lr_multiplier']):g} |" in md


def test_a_rerun_of_a_tuned_comparison_trains_nothing(tuned, capsys, no_launch):
    workdir, data_dir = tuned["clean"]
    stamps = {p: t for p, t in file_stamps(workdir).items() if p.suffix not in (".csv", ".md", ".png")}
    proc = main_here(compare, _args(workdir, data_dir), capsys)
    assert proc.returncode == 0 and no_launch == [], proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    assert len(lines) == 3 and all("already done" in ln for ln in lines), proc.stdout
    assert {p: t for p, t in file_stamps(workdir).items() if p in stamps} == stamps  # no run folder touched


def test_a_failed_tuning_run_is_no_candidate_and_not_retried(tmp_path, capsys, no_launch):
    args = _args(tmp_path, "unused")
    assert main_here(compare, args, capsys).returncode == 1  # no_launch fails every run: nothing to choose
    assert len(no_launch) == 2 and all((tmp_path / "tune" / f"allreduce_k8_lr{m}_mom0.9" / tune.FAILED_FILE).exists()
                                       for m in ("0.25", "2"))
    proc = main_here(compare, args, capsys)
    assert len(no_launch) == 2 and proc.returncode == 1  # the recorded failures are not retried
    assert proc.stderr.splitlines()[-1].startswith("lbsgd.compare: error: every tuning run of allreduce, k=8 failed")


@pytest.mark.parametrize("flags,message", [
    (["--tune", "--tune_grid=lr=0.5,x"], "positive multipliers"),
    (["--tune", "--tune_grid=lr=1;lr=2"], "keys lr and momentum, once each"),
    (["--tune", "--tune_grid=momentum=1"], "momenta in [0, 1)"),
    (["--tune", "--tune_grid="], "is empty"),
    (["--tune", "--validation_fraction=1"], "must be in (0, 1)"),
    (["--tune_grid=lr=1"], "need --tune"),
])
def test_bad_tuning_flags_are_one_line(tmp_path, capsys, no_launch, flags, message):
    with pytest.raises(SystemExit) as e:
        compare.main(["--config=experiments/digits.py", f"--workdir={tmp_path}", *flags])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert tune.parse_grid("lr=1") == (tune.Point(1.0, 0.9), tune.Point(1.0, 0.5))  # a missing key: the default's
