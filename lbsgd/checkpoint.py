"""A run's checkpoints in one place: listing, saving, restoring with a fallback, and the resume check.

Layout of a workdir::

    WORKDIR/checkpoints/<step>/       orbax checkpoints (atomic: written aside, renamed when complete)
    WORKDIR/checkpoints_damaged/<step>  checkpoints that failed to restore, moved aside (kept for a post-mortem)
    WORKDIR/config.json               the config the run was started (or last resumed) with

* Listing uses orbax's own step listing (``orbax.checkpoint.utils.checkpoint_steps``).
* ``restore_latest`` restores the newest checkpoint; if it is truncated or unreadable it moves it aside,
  warns in one line naming both steps, and falls back to the next newest intact one. At least two
  checkpoints are kept (``MAX_TO_KEEP`` = 3), so one damaged save loses one checkpoint interval.
* ``check_resume`` compares the config with the one recorded in the workdir before anything is compiled:
  a field that changes the state or the data order (``STATE_FIELDS`` and the active strategy's options)
  must not change; any other field may (``num_epochs``, intervals, rates ...) and is logged.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import sys
import warnings
from typing import Any, Callable

from lbsgd import strategies
from lbsgd.errors import CheckpointError

#: The warning a failed read's un-awaited orbax/tensorstore coroutines give when they are collected.
NEVER_AWAITED = r"coroutine '.*' was never awaited"

log = logging.getLogger("lbsgd")

MAX_TO_KEEP = 3
CONFIG_FILE = "config.json"
ITEM = "default"  # the CheckpointManager's item directory inside each step
# Fields whose change makes a checkpoint mean something else: its shapes (k, model, optimizer state,
# strategy state) or the examples each step sees (dataset, preprocessing, k, n, seed).
STATE_FIELDS = (
    "dataset",
    "image_size",
    "augment",
    "num_workers",
    "per_worker_batch_size",
    "model",
    "model_width",
    "model_stem",
    "dtype",
    "optimizer",
    "strategy",
    "topology",
    "seed",
    "noise_scale",
)


def checkpoint_dir(workdir: str) -> str:
    """``WORKDIR/checkpoints`` (absolute)."""
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def steps(workdir: str) -> list[int]:
    """The steps of the committed checkpoints in ``workdir``, oldest first (orbax's listing)."""
    import orbax.checkpoint as ocp

    directory = checkpoint_dir(workdir)
    return sorted(ocp.utils.checkpoint_steps(directory)) if os.path.isdir(directory) else []


def describe_latest(workdir: str | None) -> str:
    """``'step N in DIR'`` for the newest checkpoint of ``workdir``, or ``'none yet'``."""
    found = steps(workdir) if workdir else []
    return f"step {found[-1]} in {checkpoint_dir(workdir)}" if found else "none yet"


def manager(workdir: str):
    """The run's orbax ``CheckpointManager`` (keeps the newest ``MAX_TO_KEEP``; saves are atomic)."""
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(max_to_keep=MAX_TO_KEEP, create=True)
    )


def save(mngr, step: int, state, force: bool = False) -> None:
    """Save ``state`` as checkpoint ``step`` (asynchronously; ``mngr.wait_until_finished`` commits it)."""
    import orbax.checkpoint as ocp

    mngr.save(step, args=ocp.args.StandardSave(state), force=force)


@contextlib.contextmanager
def _quiet_failures():
    """Keep a failing restore's library noise (orbax's error log, tensorstore's un-awaited coroutine
    tracebacks and "coroutine ... was never awaited" warnings) off stderr: the failure is reported in one
    line by the caller."""
    loggers = [logging.getLogger(name) for name in ("absl", "orbax", "asyncio")]
    levels = [lg.level for lg in loggers]
    hook = sys.unraisablehook
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda _unraisable: None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=NEVER_AWAITED, category=RuntimeWarning)
            try:
                yield
            finally:
                gc.collect()  # the failed read's coroutines are reported when collected: collect them here
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        sys.unraisablehook = hook


def _is_closed_loop(exc) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def _drop_closed_loop_errors() -> None:
    """After a failed read, tensorstore may still complete futures into orbax's closed asyncio loops,
    from its own threads, later: each prints a 'RuntimeError: Event loop is closed' traceback; and the
    read's unretrieved asyncio task errors are logged when collected. Drop exactly those (every other
    error still reaches the previous hooks and handlers), and the "coroutine ... was never awaited"
    warnings of its coroutines that are collected later still. Installed once."""
    import threading

    if getattr(sys.excepthook, "_lbsgd_quiet", False):
        return
    previous_sys, previous_thread, previous_unraisable = sys.excepthook, threading.excepthook, sys.unraisablehook

    def sys_hook(kind, value, tb):
        if not _is_closed_loop(value):
            previous_sys(kind, value, tb)

    def thread_hook(args):
        if not _is_closed_loop(args.exc_value):
            previous_thread(args)

    def unraisable_hook(unraisable):
        if not _is_closed_loop(unraisable.exc_value):
            previous_unraisable(unraisable)

    sys_hook._lbsgd_quiet = True
    sys.excepthook, threading.excepthook, sys.unraisablehook = sys_hook, thread_hook, unraisable_hook
    # The failed read's asyncio tasks report themselves when collected ("Task exception was never
    # retrieved"), through the 'asyncio' logger: the read error was already reported in one line.
    logging.getLogger("asyncio").addFilter(lambda record: "exception was never retrieved" not in record.getMessage())
    warnings.filterwarnings("ignore", message=NEVER_AWAITED, category=RuntimeWarning)


def _reason(error: Exception) -> str:
    """The first sentence of an error (tensorstore appends pages of spec), prefixed by its type."""
    text = " ".join(str(error).split()).split(" See full ")[0]
    return f"{type(error).__name__}: {text[:160]}"


def restore_latest(mngr, workdir: str, abstract_state, is_chief: bool = True, barrier: Callable | None = None):
    """Restore the newest intact checkpoint into the shapes/shardings of ``abstract_state``.

    Returns the restored state, or None when the workdir has no checkpoint. A checkpoint that fails to
    restore is moved to ``WORKDIR/checkpoints_damaged/<step>`` (by the chief, after ``barrier``) and the
    next newest is tried, with one warning line naming both steps. Raises ``CheckpointError`` when
    none restores.
    """
    import orbax.checkpoint as ocp

    candidates = sorted(mngr.all_steps(), reverse=True)
    if not candidates:
        return None
    damaged, state, restored = [], None, None
    for step in candidates:
        # A checkpointer of its own per attempt: a damaged step must not leave state behind that makes
        # the next (intact) one fail too (a manager that met a step without its item does).
        path = os.path.join(checkpoint_dir(workdir), str(step), ITEM)
        errors = []
        for _attempt in range(2):  # a second try, so a passing hiccup never condemns an intact checkpoint
            try:
                with _quiet_failures(), ocp.StandardCheckpointer() as reader:
                    state = reader.restore(path, abstract_state)
                restored = step
                break
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: orbax/tensorstore/json errors
                errors.append(e)
        if restored is not None:
            break
        damaged.append((step, _reason(errors[-1])))
        _drop_closed_loop_errors()
    if damaged:
        if barrier is not None:
            barrier()
        if is_chief:
            aside = os.path.join(os.path.abspath(workdir), "checkpoints_damaged")
            os.makedirs(aside, exist_ok=True)
            for step, _ in damaged:
                target = os.path.join(aside, str(step))
                shutil.rmtree(target, ignore_errors=True)
                os.replace(os.path.join(checkpoint_dir(workdir), str(step)), target)
        if barrier is not None:
            barrier()
        mngr.reload()
        listed = ", ".join(f"step {s} ({why})" for s, why in damaged)
        if state is None:
            raise CheckpointError(
                f"no intact checkpoint in {checkpoint_dir(workdir)}: {listed}; damaged checkpoints were moved to "
                f"{os.path.join(os.path.abspath(workdir), 'checkpoints_damaged')}; use a new --workdir to start fresh"
            )
        log.warning(
            "checkpoint %s damaged and moved to checkpoints_damaged/; resuming from step %d, the newest intact "
            "checkpoint",
            " and ".join(f"step {s} ({why})" for s, why in damaged) + (" is" if len(damaged) == 1 else " are"),
            restored,
        )
    return state


def load(workdir: str, step: int | None = None) -> dict[str, Any]:
    """Read a checkpoint of ``workdir`` as a pytree of numpy arrays on the host (any topology).

    ``step=None`` reads the latest. Returns ``{'step', 'params', 'batch_stats', 'opt_state', 'extra',
    'nonfinite'}``; each ``batch_stats`` leaf has the leading worker axis of size k (and so do ``params``
    and ``opt_state`` for decentralized strategies).
    """
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    found = steps(workdir)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}")
    path = os.path.join(checkpoint_dir(workdir), str(found[-1] if step is None else step), ITEM)
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def _plain(config) -> dict[str, Any]:
    """The config as JSON values (tuples become lists), so a recorded and a live config compare equal."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(raw, default=repr))


def state_fields(config) -> tuple[str, ...]:
    """The fields a resume must keep: ``STATE_FIELDS`` and the active strategy's own option section."""
    entry = strategies.REGISTRY.get(config.strategy)
    section = entry.section if entry is not None else None
    return STATE_FIELDS + ((section,) if section else ())


def check_resume(workdir: str, config) -> dict[str, tuple[Any, Any]]:
    """Compare ``config`` with the config recorded in ``workdir`` when it has checkpoints.

    Raises ``CheckpointError`` (one line listing each differing state field, recorded → given, and how
    to start fresh) if a field of ``state_fields`` differs. Returns the other fields that changed,
    ``{field: (recorded, given)}`` (allowed on resume). Nothing to check without checkpoints or a record.
    A state field missing from the record (added to lbsgd later) counts as unchanged while it is off.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not steps(workdir):
        return {}
    if not os.path.isfile(path):
        log.warning("%s has checkpoints but no %s (an older run): resuming unchecked", workdir, CONFIG_FILE)
        return {}
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is unreadable ({_reason(e)}); restore it, or use a new --workdir to start fresh"
        ) from None
    given = _plain(config)
    changed = {
        key: (recorded.get(key), given.get(key))
        for key in sorted(set(recorded) | set(given))
        if recorded.get(key) != given.get(key)
    }
    keep = state_fields(config)
    # A field the record lacks (added to lbsgd after that run) whose given value is off (False, 0, '')
    # leaves the state as it was: not a difference.
    refused = {key: v for key, v in changed.items() if key in keep and not (key not in recorded and not v[1])}
    if refused:
        listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in refused.items())
        raise CheckpointError(
            f"--workdir={workdir} holds checkpoints of another run; these config fields differ from it: {listed}; "
            f"rerun with the recorded values (see {path}) or use a new --workdir to start fresh"
        )
    return {key: values for key, values in changed.items() if key not in keep}


def record_config(workdir: str, config) -> None:
    """Write ``config`` to ``WORKDIR/config.json`` (atomically): the reference for the next resume."""
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(_plain(config), f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
