"""Config checks that run before anything is compiled; each failure is one line naming the field and the fix."""

from __future__ import annotations

import math
import os
import tempfile

from lbsgd.optim import DECAYS, LR_SCALINGS, OPTIMIZERS, TRUST_RATIOS, WARMUPS

DTYPES = ("float32", "bfloat16")  # float16 needs loss scaling, which lbsgd does not do: refused
AUGMENTATIONS = ("none", "shift", "inception")
DATASETS = ("digits", "imagenet2012", "tfds:<name>", "folder:<path>")


class ConfigError(ValueError):
    """An invalid configuration; ``str(e)`` is a one-line message saying what is wrong and how to fix it."""


def _choice(config, field, choices, shown=None):
    value = config.get(field)
    if value not in choices:
        raise ConfigError(f"config.{field}={value!r} is unknown; use one of: {', '.join(shown or choices)}")


def _positive(config, field, kind=(int,)):
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"config.{field}={value!r} must be a positive number; set --config.{field}=<value > 0>")


def _in_range(config, field, low, high, default=0.0, high_open=False):
    """A finite number in [low, high] (or [low, high) with ``high_open``)."""
    value = config.get(field, default)
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and low <= value
        and (value < high if high_open else value <= high)
    )
    if not ok:
        raise ConfigError(
            f"config.{field}={value!r} must be a number in [{low}, {high}{')' if high_open else ']'}; "
            f"set --config.{field}=<value in range>"
        )


def check_config(config) -> None:
    """Static checks of names and values (no devices, no data)."""
    from lbsgd import strategies
    from lbsgd.models import resnet
    from lbsgd.parallel.aggregators import AGGREGATIONS

    for field in (
        "num_workers",
        "per_worker_batch_size",
        "num_epochs",
        "image_size",
        "eval_batch_size",
        "log_every_steps",
        "checkpoint_every_steps",
    ):
        _positive(config, field)
    for field in ("accumulation_steps", "max_device_batch"):
        value = config.get(field, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"config.{field}={value!r} must be 0 (automatic) or a positive integer")
    _positive(config, "base_learning_rate", (int, float))
    if "max_consecutive_nonfinite" in config:
        _positive(config, "max_consecutive_nonfinite")
    _in_range(config, "momentum", 0.0, 1.0, high_open=True)
    _in_range(config, "weight_decay", 0.0, 1.0)
    _in_range(config, "label_smoothing", 0.0, 1.0, high_open=True)
    _in_range(config, "target_accuracy", 0.0, 1.0)
    _in_range(config, "warmup_epochs", 0.0, float("inf"), high_open=True)
    _positive(config, "bucket_mb", (int, float))
    if not isinstance(config.get("num_devices"), int) or config.num_devices < 0:
        raise ConfigError(
            f"config.num_devices={config.get('num_devices')!r} must be 0 (all devices) or a positive count"
        )
    ds = config.get("dataset")
    if not isinstance(ds, str) or not (
        ds in ("digits", "imagenet2012") or (ds.startswith(("tfds:", "folder:")) and len(ds.split(":", 1)[1]) > 0)
    ):
        raise ConfigError(f"config.dataset={ds!r} is unknown; use one of: {', '.join(DATASETS)}")
    try:  # the strategy name, its topology and options (names defined beside the strategies)
        strategies.check_config(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _choice(config, "aggregation", AGGREGATIONS)
    _choice(config, "warmup", WARMUPS)
    _choice(config, "decay", DECAYS)
    _choice(config, "optimizer", OPTIMIZERS)
    if "lars_trust_ratio" in config:
        _choice(config, "lars_trust_ratio", TRUST_RATIOS)
    check_scaling(config)
    if config.get("dtype") == "float16":
        raise ConfigError(
            "config.dtype='float16' needs loss scaling, which lbsgd does not do; use --config.dtype=bfloat16 "
            "(float32's range at half the bytes) or float32"
        )
    _choice(config, "dtype", DTYPES)
    from lbsgd.train import NONFINITE_POLICIES

    if "on_nonfinite" in config:
        _choice(config, "on_nonfinite", NONFINITE_POLICIES)
    _choice(config, "augment", AUGMENTATIONS)
    _choice(config, "model", tuple(resnet.ARCHITECTURES))


def check_scaling(config) -> None:
    """``lr_scaling`` and its inputs, and the noise-scale estimate's preconditions."""
    if "lr_scaling" in config:
        _choice(config, "lr_scaling", LR_SCALINGS)
    for field in ("b_noise", "lr_max"):
        _in_range(config, field, 0.0, float("inf"), high_open=True)
    _in_range(config, "noise_scale_decay", 0.0, 1.0, default=0.99, high_open=True)
    if config.get("lr_scaling") == "saturating":
        if not config.get("b_noise") and not config.get("b_noise_from"):
            raise ConfigError(
                "config.lr_scaling='saturating' needs the gradient noise scale: set --config.b_noise=<examples> or "
                "--config.b_noise_from=<workdir of a run with --config.noise_scale=True>"
            )
        if config.get("b_noise") and config.get("b_noise_from"):
            raise ConfigError("set one of config.b_noise and config.b_noise_from, not both")
    noise = config.get("noise_scale", False)
    if not isinstance(noise, bool):
        raise ConfigError(f"config.noise_scale={noise!r} must be True or False")
    if noise and config.get("strategy", "allreduce") != "allreduce":
        raise ConfigError(
            f"config.noise_scale=True needs one gradient summed over all workers (strategy 'allreduce'), not "
            f"{config.get('strategy')!r}; measure it in an allreduce run"
        )
    if noise and config.get("num_workers", 1) < 2:
        raise ConfigError(
            "config.noise_scale=True compares one worker's gradient with the sum over k workers: set "
            "--config.num_workers to 2 or more"
        )


def resolve_b_noise(config) -> float | None:
    """With ``config.b_noise_from`` (a workdir or its results.json): set ``config.b_noise`` to the noise
    scale that run measured over its whole training (``noise_scale_run``) and return it; None when there
    is nothing to resolve."""
    import json

    source = config.get("b_noise_from", "")
    if not source:
        return None
    path = os.path.join(source, "results.json") if os.path.isdir(source) else source
    try:
        with open(path) as f:
            value = json.load(f).get("noise_scale_run")
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"config.b_noise_from={source!r}: cannot read a results.json there ({getattr(e, 'strerror', None) or e}); "
            f"point it at the workdir of a finished run with --config.noise_scale=True"
        ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"config.b_noise_from={source!r}: its results.json has no positive noise_scale_run (found {value!r}); "
            f"rerun that run with --config.noise_scale=True"
        )
    config.b_noise = float(value)
    config.b_noise_from = ""
    return float(value)


def check_layout(config, num_devices_available: int, num_processes: int = 1) -> None:
    """k must be a positive multiple of the device count in use (which must exist)."""
    from lbsgd.parallel import layout

    k = config.num_workers
    try:
        d = layout.check_placement(k, config.num_devices, num_devices_available, num_processes)
    except layout.LayoutError as e:
        raise ConfigError(str(e)) from None
    m = k // d
    if config.accumulation_steps and m % config.accumulation_steps:
        raise ConfigError(
            f"config.accumulation_steps={config.accumulation_steps} must divide the {m} workers per "
            f"device (k={k} / d={d})"
        )


def check_dataset(config, num_train_examples: int) -> None:
    """The global minibatch kn must fit in the training set."""
    kn = config.num_workers * config.per_worker_batch_size
    if kn > num_train_examples:
        raise ConfigError(
            f"global batch num_workers*per_worker_batch_size={kn} is larger than the "
            f"{num_train_examples} training examples of {config.dataset}; lower --config.num_workers "
            f"or --config.per_worker_batch_size"
        )


def check_workdir(workdir: str) -> None:
    """The workdir must be creatable and writable."""
    if not workdir:
        raise ConfigError("--workdir is required; pass --workdir=<a writable directory>")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test"):
            pass
    except OSError as e:
        raise ConfigError(f"--workdir={workdir} is not writable ({e.strerror or e}); choose another --workdir") from e
