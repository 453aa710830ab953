"""Config checks that run before anything is compiled; each failure is one line naming the field and the fix.

``check_config`` checks every field of ``lbsgd.config.schema.FIELDS`` (its type, range or choices), the
strategy settings (``lbsgd.strategies.registry.check_config``: the strategy, its topology and options)
and the fields that depend on each other; ``check_layout``, ``check_dataset`` and ``check_workdir`` check
what needs the devices, the data or the file system.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tempfile

from lbsgd import strategies
from lbsgd.config import schema
from lbsgd.errors import ConfigError, LayoutError
from lbsgd.parallel import layout


def check_fields(config) -> None:
    """Every field is known and valid by itself: one line naming the first that is not."""
    known = set(schema.names())
    for name in config.keys():
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean {close[0]}?" if close else "see lbsgd/config/schema.py for the fields"
            raise ConfigError(f"config.{name} is not a config field; {hint}")
    for field in schema.FIELDS:
        if field.name not in config:
            raise ConfigError(
                f"config.{field.name} is missing; start the config from lbsgd.config.schema.base_config() "
                f"(default {field.default!r})"
            )
        if field.name == "dtype" and config.dtype == "float16":
            raise ConfigError(
                "config.dtype='float16' needs loss scaling, which lbsgd does not do; use --config.dtype=bfloat16 "
                "(float32's range at half the bytes) or float32"
            )
        problem = field.problem(config.get(field.name))
        if problem:
            raise ConfigError(problem)
    if config.dtype not in schema.DTYPES:
        raise ConfigError(f"config.dtype={config.dtype!r} is unknown; use one of: {', '.join(schema.DTYPES)}")


def check_config(config) -> None:
    """Static checks of names and values (no devices, no data)."""
    check_fields(config)
    strategies.check_config(config)
    check_scaling(config)
    check_bn_groups(config)


def check_scaling(config) -> None:
    """The saturating rule's inputs, and the noise-scale estimate's preconditions."""
    if config.lr_scaling == "saturating":
        if not config.get("b_noise") and not config.get("b_noise_from"):
            raise ConfigError(
                "config.lr_scaling='saturating' needs the gradient noise scale: set --config.b_noise=<examples> or "
                "--config.b_noise_from=<workdir of a run with --config.noise_scale=True>"
            )
        if config.get("b_noise") and config.get("b_noise_from"):
            raise ConfigError("set one of config.b_noise and config.b_noise_from, not both")
    if config.noise_scale and not strategies.REGISTRY[config.strategy].cls.supports_noise_scale:
        raise ConfigError(
            f"config.noise_scale=True needs one gradient summed over all workers (strategy 'allreduce'), not "
            f"{config.strategy!r}; measure it in an allreduce run"
        )
    if config.noise_scale and config.num_workers < 2:
        raise ConfigError(
            "config.noise_scale=True compares one worker's gradient with the sum over k workers: set "
            "--config.num_workers to 2 or more"
        )


def check_bn_groups(config) -> None:
    """BN groups of g = ``config.bn_group_size`` workers: g divides k; g > 1 needs a strategy whose workers
    take their gradients at one shared copy of the parameters, and per-worker BN for the noise scale."""
    g, k = config.bn_group_size, config.num_workers
    if k % g:
        divisors = ", ".join(str(i) for i in range(1, k + 1) if k % i == 0)
        raise ConfigError(
            f"config.bn_group_size={g} must divide config.num_workers={k} (groups of consecutive workers); "
            f"use one of {divisors}"
        )
    if g == 1:
        return
    if not strategies.REGISTRY[config.strategy].cls.supports_bn_groups:
        accepting = ", ".join(repr(name) for name, e in sorted(strategies.REGISTRY.items()) if e.cls.supports_bn_groups)
        raise ConfigError(
            f"config.bn_group_size={g} needs workers that share one copy of the parameters, which strategy "
            f"{config.strategy!r} has not; use strategy {accepting} or --config.bn_group_size=1"
        )
    if config.noise_scale:
        raise ConfigError(
            f"config.noise_scale=True needs each worker's own gradient, which BN groups of {g} workers do not give; "
            f"use --config.bn_group_size=1 to measure it"
        )


def resolve_b_noise(config) -> float | None:
    """With ``config.b_noise_from`` (a workdir or its results.json): set ``config.b_noise`` to the noise
    scale that run measured over its whole training (``noise_scale_run``) and return it; None when there
    is nothing to resolve."""
    source = config.get("b_noise_from", "")
    if not source:
        return None
    path = os.path.join(source, "results.json") if os.path.isdir(source) else source
    try:
        with open(path) as f:
            record = json.load(f)
        value = record.get("noise_scale_run") if isinstance(record, dict) else None
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
    k = config.num_workers
    try:
        d = layout.check_placement(k, config.num_devices, num_devices_available, num_processes)
    except LayoutError as e:
        raise ConfigError(str(e)) from None
    m = k // d
    if config.accumulation_steps and m % config.accumulation_steps:
        raise ConfigError(
            f"config.accumulation_steps={config.accumulation_steps} must divide the {m} workers per "
            f"device (k={k} / d={d})"
        )
    check_bn_group_layout(config, m, d)


def check_bn_group_layout(config, m: int, d: int) -> None:
    """A BN group of g workers lies within one device (g divides m) or spans whole devices (m divides g),
    and ``config.accumulation_steps`` keeps each device's groups whole."""
    g, a = config.bn_group_size, config.accumulation_steps
    if g == 1:
        return
    if m % g and g % m:
        raise ConfigError(
            f"config.bn_group_size={g} must divide, or be a multiple of, the {m} workers per device (k={m * d} / "
            f"d={d}); choose another --config.num_devices or --config.bn_group_size"
        )
    units = m // g if g <= m else 1
    if a and units % a:
        raise ConfigError(
            f"config.accumulation_steps={a} must divide the {units} BN groups per device (bn_group_size={g}, "
            f"{m} workers per device): a microstep holds whole groups"
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


def check_workdir(workdir: str) -> str:
    """The workdir, with ``~`` expanded, made absolute, must be creatable and writable, short enough for
    the files a checkpoint writes below it, and hold no ``checkpoints`` that is not a writable directory
    (``lbsgd.checkpoint.path_problem``, ``check_dir``). Returns that absolute path (use it from here on:
    ``--workdir=~/x`` is ``$HOME/x``, not ``./~/x``)."""
    from lbsgd import checkpoint
    from lbsgd.errors import CheckpointError

    if not workdir:
        raise ConfigError("--workdir is required; pass --workdir=<a writable directory>")
    path = os.path.abspath(os.path.expanduser(workdir))
    problem = checkpoint.path_problem(path)
    if problem:
        raise ConfigError(problem)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test"):
            pass
    except OSError as e:
        raise ConfigError(
            f"--workdir={checkpoint.short_path(path)} is not writable ({e.strerror or e}); choose another --workdir"
        ) from None
    try:
        checkpoint.check_dir(path)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    return path
