"""Several steps per dispatch (``config.steps_per_dispatch``, a ``lax.scan`` on the device): bit-identical to
one step per call for any strategy and layout, with the loop's cadence rounded to the dispatch."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from lbsgd import checkpoint, train

STEPS = 10


def _run(data_dir, workdir, s, **fields):
    config = tiny_config(data_dir, max_steps=STEPS, steps_per_dispatch=s, checkpoint_every_steps=2, **fields)
    results = train.train_and_evaluate(config, str(workdir))
    return results, checkpoint.load(str(workdir))


# k = 8 workers on 2 devices (shared parameters), and a per-worker strategy (own parameters, push-sum weights,
# a step-dependent peer draw) with all its workers on one device. k = 4 there: on CPU the device loop is
# unrolled and each worker's gradient is its own copy of the network in the program, so the compile grows
# with s x k (k = 8: ~28 s for this case alone, k = 4: ~15 s; the same code path, half the program).
@pytest.mark.parametrize("strategy, devices, workers", [("allreduce", 2, 8), ("gossip_push", 1, 4)])
def test_three_steps_per_dispatch_are_three_single_steps(data_dir, tmp_path, strategy, devices, workers):
    """s = 3 over 10 steps: three dispatches of 3 and one of 1 (the remainder), against 10 single steps.
    The same computation; XLA's CPU backend fuses the step a little differently inside the device loop, so
    a few parameters differ in their last bits after 10 steps (float32 rounding, within 1e-5)."""
    fields = dict(strategy=strategy, num_devices=devices, num_workers=workers)
    want, want_state = _run(data_dir, tmp_path / "one", 1, **fields)
    got, got_state = _run(data_dir, tmp_path / "three", 3, **fields)
    assert got["steps"] == want["steps"] == STEPS
    for key in ("train_loss", "eval_loss", "eval_accuracy"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Checkpoints every 2 steps, rounded to the dispatch: saved after steps 3, 6, 9 and 10 (the last 3 kept).
    kept = sorted(int(d) for d in os.listdir(tmp_path / "three" / "checkpoints") if d.isdigit())
    assert kept == [6, 9, 10]
    # The training log: every step is in exactly one epoch row (1 epoch = 1437 // (4k) >= 44 steps: the end at
    # step 10).
    rows = [json.loads(line) for line in open(tmp_path / "three" / "train_history.jsonl")]
    assert [r["steps_averaged"] for r in rows] == [STEPS] and rows[-1]["step"] == STEPS
