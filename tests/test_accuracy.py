"""Acceptance runs through the real CLI: D-PSGD on a ring >= 98 % (issue #9); EASGD and the asynchronous
parameter server >= 97 % (issue #10), on the digits with k = 8 workers x n = 16. Each run is ``lbsgd.main.run()``,
the console script's entry, in a process forked from one that has imported the libraries (``forkrun``)."""

import json

from conftest import fork_runner


def test_dpsgd_ring_trains_digits_through_main(tmp_path, data_dir):
    """k = 8 workers x n = 16, each with its own model, averaging with its ring neighbours only.

    20 epochs (the budget of the README's comparison table, where every strategy reaches >= 98.3 %).
    """
    proc = fork_runner().run(
        "--config=experiments/digits.py",
        f"--workdir={tmp_path}",
        f"--config.data_dir={data_dir}",
        "--config.strategy=dpsgd",
        "--config.topology=ring",
        "--config.num_epochs=20",
        "--config.eval_every_epochs=0",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["strategy"] == "dpsgd" and results["topology"] == "ring" and results["num_workers"] == 8
    assert results["eval_accuracy"] >= 0.98, results["eval_accuracy"]
    assert 0 < results["consensus_distance"] < 1e-3  # the workers differ, but little, at the end
    assert results["bytes_sent_per_worker_per_step"] == 2 * 4 * results["num_params"]  # two neighbours


def test_easgd_and_async_ps_train_digits_through_main(tmp_path, data_dir):
    """k = 8: EASGD with its defaults (β = 0.8, τ = 1, 20 epochs, the default ResNet-8) and the parameter
    server with gradients up to k − 1 = 7 steps stale (the default ResNet-8, 40 epochs, momentum 0.5:
    asynchrony already acts like extra momentum; measured 98.33 / 98.61 % on seeds 0 / 1)."""
    cases = {
        "easgd": ["--config.strategy=easgd", "--config.num_epochs=20"],
        "async_ps": [  # as in README: 40 epochs (20 reach ~90 %)
            "--config.strategy=async_ps",
            "--config.async_ps.staleness=7",
            "--config.momentum=0.5",
            "--config.num_epochs=40",
        ],
    }
    for name, args in cases.items():
        proc = fork_runner().run(
            "--config=experiments/digits.py",
            f"--workdir={tmp_path / name}",
            f"--config.data_dir={data_dir}",
            "--config.eval_every_epochs=0",
            *args,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["strategy"] == name and results["num_workers"] == 8
        assert results["eval_accuracy"] >= 0.97, (name, results["eval_accuracy"])
    assert results["train_staleness_max"] == 7 and results["train_staleness_mean"] == 3.5
