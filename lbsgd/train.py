"""Training in Goyal et al.'s terms (k workers x n examples), under its older import path.

The trainer lives in ``lbsgd.trainer`` (one module per job); this module re-exports its public names so
that ``lbsgd.train.make_train_step``, ``create_train_state`` and ``train_and_evaluate`` keep working.
"""

from lbsgd.errors import Interrupted, NonFinite
from lbsgd.config.schema import NONFINITE_POLICIES
from lbsgd.parallel.layout import global_batch
from lbsgd.trainer.evaluation import evaluate, evaluate_run
from lbsgd.trainer.grads import cross_entropy
from lbsgd.trainer.loop import LoopResult, check_nonfinite, record_epoch, train_loop
from lbsgd.trainer.results import noise_results, previous_train_metrics, write_results
from lbsgd.trainer.build import Program, build, resolve_accumulation
from lbsgd.trainer.setup import Run, build_model, restore_or_init, setup
from lbsgd.trainer.state import (
    INIT_CPU_COMPILER_OPTIONS,
    TrainState,
    create_train_state,
    init_compiler_options,
    model_bytes,
    num_parameters,
    run_once,
    state_specs,
)
from lbsgd.trainer.step import make_consensus_fn, make_eval_step, make_train_step
from lbsgd.trainer.train import train_and_evaluate

__all__ = [
    "INIT_CPU_COMPILER_OPTIONS",
    "Interrupted",
    "LoopResult",
    "NONFINITE_POLICIES",
    "NonFinite",
    "Program",
    "Run",
    "TrainState",
    "build",
    "build_model",
    "check_nonfinite",
    "create_train_state",
    "cross_entropy",
    "evaluate",
    "evaluate_run",
    "global_batch",
    "init_compiler_options",
    "make_consensus_fn",
    "make_eval_step",
    "make_train_step",
    "model_bytes",
    "noise_results",
    "num_parameters",
    "previous_train_metrics",
    "record_epoch",
    "resolve_accumulation",
    "restore_or_init",
    "run_once",
    "setup",
    "state_specs",
    "train_and_evaluate",
    "train_loop",
    "write_results",
]
