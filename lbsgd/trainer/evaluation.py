"""Evaluation of the strategy's model over every evaluation example exactly once (the eval step itself is
``lbsgd.trainer.step.make_eval_step``).

The evaluated model is the strategy's evaluation model (the shared copy, the workers' average, EASGD's
centre, …) with the BN running statistics averaged over the k workers (each worker keeps its own; with
BN groups of g workers every worker of a group holds the group's, so this is the mean over the k/g groups).
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np

from lbsgd.data import pipeline
from lbsgd.parallel.layout import global_batch

log = logging.getLogger("lbsgd")


def evaluate(eval_step, state, dataset, layout, config, model_name: str = "") -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy over every evaluation example exactly once.

    ``model_name`` picks one of the strategy's ``extra_eval_params`` instead of its evaluation model."""
    d = layout.num_devices
    per_device = max(1, -(-config.eval_batch_size // d))
    global_size = per_device * d
    local_slots = per_device * len(layout.local_device_positions)
    first = layout.local_device_positions[0] * per_device
    totals = np.zeros(4, np.float64)
    for batch in pipeline.eval_iterator(
        dataset,
        global_batch_size=global_size,
        first_slot=first,
        num_local_slots=local_slots,
        augment=config.augment,
        image_size=config.image_size,
    ):
        b = global_batch(layout, batch)
        sums = eval_step(state, b["image"], b["label"], b["mask"], model_name=model_name)
        totals += np.asarray(jax.device_get(sums), np.float64)
    count = totals[3]
    return {
        "eval_loss": totals[0] / count,
        "eval_accuracy": totals[1] / count,
        "eval_top5_accuracy": totals[2] / count,
        "eval_examples": count,
    }


def evaluate_run(run, eval_step, consensus_fn, state, step: int) -> dict[str, float]:
    """Evaluate ``run``'s model (a ``lbsgd.trainer.setup.Run``), add the consensus distance, write them at
    ``step`` (events and ``eval_history.jsonl``) and log one line."""
    metrics = evaluate(eval_step, state, run.dataset, run.layout, run.config)
    metrics["consensus_distance"] = float(jax.device_get(consensus_fn(state)))
    target = run.config.target_accuracy
    if target and run.target_reached_s is None and metrics["eval_accuracy"] >= target:
        run.target_reached_s = time.time() - run.t_start
    for name in run.strategy.extra_eval_models:
        other = evaluate(eval_step, state, run.dataset, run.layout, run.config, model_name=name)
        metrics.update({f"{key}_{name}": value for key, value in other.items() if key != "eval_examples"})
    run.writer.write_scalars(step, metrics)
    if run.is_chief:  # one line per evaluation, kept across resumes (a reader keeps the last line per step)
        with open(os.path.join(run.workdir, "eval_history.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "epoch": step / run.steps_per_epoch, **metrics}) + "\n")
    log.info(
        "step %d/%d (epoch %.2f): eval accuracy %.4f, loss %.4f, consensus distance %.3g",
        step,
        run.total_steps,
        step / run.steps_per_epoch,
        metrics["eval_accuracy"],
        metrics["eval_loss"],
        metrics["consensus_distance"],
    )
    return metrics
