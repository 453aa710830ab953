"""results.json: the final evaluation, the run's shape and strategy, its cost and its timings."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax

from lbsgd import noise_scale as noise_scale_lib
from lbsgd import optim
from lbsgd.trainer.evaluation import evaluate_run
from lbsgd.trainer.loop import LoopResult
from lbsgd.trainer.setup import Run
from lbsgd.trainer.state import TrainState, model_bytes, num_parameters

log = logging.getLogger("lbsgd")


def noise_results(state: TrainState) -> dict[str, float | None]:
    """results.json's ``noise_scale`` (B_simple, in examples), ``noise_g2`` and ``noise_trace`` at the end
    of training (their moving averages) and ``noise_scale_run`` (averaged over the whole run); None when
    the run did not estimate them."""
    if not state.noise:
        return {"noise_scale": None, "noise_g2": None, "noise_trace": None, "noise_scale_run": None}
    return {key: float(value) for key, value in jax.device_get(noise_scale_lib.read(state.noise)).items()}


def previous_train_metrics(workdir: str, step: int) -> dict[str, Any]:
    """The last step's training metrics as ``WORKDIR/results.json`` recorded them when the run reached
    ``step`` (a finished run started again has no step of its own to report); ``{}`` when that file is
    missing, unreadable or from another step (results.json then has ``train_loss: null``)."""
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(old, dict) or old.get("steps") != step:
        return {}
    metrics = {key[len("train_") :]: value for key, value in old.items() if key.startswith("train_")}
    metrics.pop("s", None)  # train_s: the time, not a step metric
    return metrics


def _float_or_none(value) -> float | None:
    return None if value is None else float(value)


def _evaluation_fields(run: Run, eval_metrics: dict, last_metrics: dict) -> dict[str, Any]:
    """The final evaluation, the strategy's extra evaluation models and its own training metrics."""
    extra_models = run.strategy.extra_eval_models
    return {
        "eval_accuracy": float(eval_metrics["eval_accuracy"]),
        "eval_loss": float(eval_metrics["eval_loss"]),
        "eval_top1_error": 1.0 - float(eval_metrics["eval_accuracy"]),
        "eval_top5_error": 1.0 - float(eval_metrics["eval_top5_accuracy"]),
        "eval_examples": int(eval_metrics["eval_examples"]),
        # 'validation': held-out training examples (config.validation_fraction); 'test': the dataset's evaluation split
        "eval_split": "validation" if run.config.validation_fraction > 0 else "test",
        "train_loss": _float_or_none(last_metrics.get("loss")),  # loss of the last step, over its kn examples
    }, {
        "consensus_distance": float(eval_metrics["consensus_distance"]),
        **{key: float(value) for key, value in eval_metrics.items() if key.endswith(extra_models)},
        **{
            f"train_{key}": float(value)
            for key, value in last_metrics.items()
            if key not in ("loss", "accuracy", "learning_rate", "nonfinite") and not key.startswith("noise_")
        },
    }


def write_results(run: Run, result: LoopResult, eval_step, consensus_fn) -> dict[str, Any]:
    """The final results (evaluating the state if the loop had nothing left to do); the chief writes
    ``WORKDIR/results.json`` atomically."""
    config, lay, state = run.config, run.layout, result.state
    eval_metrics = result.eval_metrics
    if eval_metrics is None:  # nothing left to train (resumed a finished run): evaluate the final state
        eval_metrics = evaluate_run(run, eval_step, consensus_fn, state, int(state.step))
    last_metrics = result.last_metrics
    if last_metrics is None:  # no step ran here: the training figures are those of the run that ended here
        last_metrics = previous_train_metrics(run.workdir, int(state.step))
    k, n = config.num_workers, config.per_worker_batch_size
    kn = k * n
    evaluation, strategy_metrics = _evaluation_fields(run, eval_metrics, last_metrics)
    results = {
        **evaluation,
        "steps": int(state.step),
        "epochs": int(state.step) / run.steps_per_epoch,
        "global_batch_size": kn,
        "num_workers": k,
        "per_worker_batch_size": n,
        "bn_group_size": config.bn_group_size,
        "devices": lay.num_devices,
        "processes": lay.num_processes,
        "workers_per_device": lay.workers_per_device,
        "accumulation_steps": run.accumulation,
        **run.strategy.describe(),
        **strategy_metrics,
        **noise_results(state),
        "lr_scaling": config.lr_scaling,
        "peak_learning_rate": optim.peak_learning_rate(config),
        "bytes_sent_per_worker_per_step": float(
            run.strategy.bytes_sent_per_worker_per_step(k, model_bytes(state, run.strategy))
        ),
        **run.strategy.result_fields(state.extra, k, model_bytes(state, run.strategy)),
        "num_params": num_parameters(state, run.strategy),
        "nonfinite_steps_skipped": int(jax.device_get(state.nonfinite)[0]),
        "wall_time_s": time.time() - run.t_start,
        "startup_s": result.startup_s,
        "compile_s": result.compile_s,
        "train_s": result.train_time,
        "seconds_to_target": run.target_reached_s,  # null: no target set, or not reached
        "images_per_second": (result.timed_steps * kn / result.train_time) if result.train_time > 0 else 0.0,
        "backend": jax.default_backend(),
    }
    if run.is_chief:
        path = os.path.join(run.workdir, "results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(path + ".tmp", path)
        log.info("results: %s", json.dumps(results))
    return results
