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
* ``check_dir`` (``lbsgd.checkpoint_paths``; called by ``lbsgd.config.validate.check_workdir`` before
  compiling, and by ``manager``)
  refuses, in one line, a workdir where checkpoints cannot be written: a path too long for the longest
  file a checkpoint writes under it, ``checkpoints`` that is not a directory or not writable.
* A save that fails (disk full, a directory gone) raises ``CheckpointError`` in one line from the manager's
  ``save`` or ``wait_until_finished`` (orbax saves asynchronously: a failure surfaces at the next of
  these), naming the last good checkpoint; orbax's own error logs and tracebacks of it stay off stderr.
  orbax deletes the checkpoints beyond ``MAX_TO_KEEP`` only after the new one is committed, and not at
  all when its save fails, so the last intact checkpoint survives a failed or killed save.
* Any legal directory name works: orbax globs below the checkpoint directory through ``etils.epath``,
  which does not escape the directory part (``[0.1]`` is a character class there);
  ``lbsgd.orbax_io._literal_glob_base`` makes it literal, as ``pathlib`` does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from typing import Any, Callable

import jax

from lbsgd import strategies
from lbsgd.checkpoint_paths import (  # noqa: F401 - check_dir, path_problem and the reserve are this module's API too
    CHECKPOINT_PATH_RESERVE,
    check_dir,
    checkpoint_dir,
    path_problem,
    short_path,
)
from lbsgd.errors import CheckpointError
from lbsgd.orbax_io import (
    NEVER_AWAITED,  # noqa: F401 - re-exported (tests read it)
    _advice,
    _drop_closed_loop_errors,
    _errno,
    _orbax,
    _quiet_failures,
    _quiet_save_failures,
    _reason,
    _release_failed_save,
    _WRITE_ERRORS,
)

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
    "validation_fraction",
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


def steps(workdir: str) -> list[int]:
    """The steps of the committed checkpoints in ``workdir``, oldest first (orbax's listing)."""
    ocp = _orbax()

    directory = checkpoint_dir(workdir)
    return sorted(ocp.utils.checkpoint_steps(directory)) if os.path.isdir(directory) else []


def describe_latest(workdir: str | None) -> str:
    """``'step N in DIR'`` for the newest checkpoint of ``workdir``, or ``'none yet'``."""
    found = steps(workdir) if workdir else []
    return f"step {found[-1]} in {checkpoint_dir(workdir)}" if found else "none yet"


def manager(workdir: str):
    """The run's checkpoint manager: orbax's ``CheckpointManager`` keeping the newest ``MAX_TO_KEEP``
    (saves are atomic), whose ``save``, ``wait_until_finished`` and ``close`` raise ``CheckpointError``
    (one line) when a save fails. Refuses a workdir ``check_dir`` refuses."""
    ocp = _orbax()

    check_dir(workdir)
    _quiet_save_failures()
    try:
        return _manager_class()(
            checkpoint_dir(workdir),
            # cleanup_tmp_directories: a save that was killed or failed leaves no space taken on a rerun
            options=ocp.CheckpointManagerOptions(max_to_keep=MAX_TO_KEEP, create=True, cleanup_tmp_directories=True),
            workdir=workdir,
        )
    except OSError as e:
        raise CheckpointError(
            f"cannot create {short_path(checkpoint_dir(workdir))} ({e.strerror or e}); use another --workdir"
        ) from None


_MANAGER_CLASS = []


def _manager_class():
    """``CheckpointManager`` with save failures turned into ``CheckpointError`` (defined on first use:
    importing orbax is slow, and this module is imported by light tools)."""
    if _MANAGER_CLASS:
        return _MANAGER_CLASS[0]
    ocp = _orbax()

    class Manager(ocp.CheckpointManager):
        """orbax's manager; a failed save raises ``CheckpointError`` from ``save`` (a failure of the save
        itself, or of the previous one, which ran in the background) or ``wait_until_finished``."""

        def __init__(self, directory, *args, workdir: str, **kwargs):
            self._lbsgd_workdir = workdir
            self._lbsgd_pending = None  # the step of the save in flight
            super().__init__(directory, *args, **kwargs)

        def save(self, step, *args, **kwargs):
            self.wait_until_finished()  # the previous save's failure, reported with its own step
            self._lbsgd_pending = int(step)
            try:
                return super().save(step, *args, **kwargs)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore/OS errors of a save
                raise self._lbsgd_failed(int(step), e) from None

        def wait_until_finished(self):
            step = self._lbsgd_pending
            try:
                super().wait_until_finished()
            except Exception as e:  # noqa: BLE001 - the background save failed
                self._lbsgd_pending = None
                raise self._lbsgd_failed(step, e) from None

        def _lbsgd_failed(self, step, error) -> CheckpointError:
            return save_failed(self._lbsgd_workdir, step, error)

    _MANAGER_CLASS.append(Manager)
    return Manager


def write_failure(workdir: str, error: BaseException) -> CheckpointError | None:
    """For the command line: ``error``, raised while writing one of the run's own files in ``workdir``
    (TensorBoard events, train/eval histories, results.json) because the file system refused it (full,
    over quota, read-only, I/O error), as the one-line ``CheckpointError`` naming the last good
    checkpoint; None for any other error (a bug keeps its traceback)."""
    number = _errno(error)
    if number not in _WRITE_ERRORS:
        return None
    found = steps(workdir)
    last = f"the last good checkpoint is step {found[-1]}" if found else "there is no checkpoint yet"
    return CheckpointError(f"cannot write to {workdir}: {os.strerror(number)}; {_advice(number)}; {last}")


def save_failed(workdir: str, step: int | None, error: BaseException) -> CheckpointError:
    """The one-line error for a save of ``step`` that failed with ``error``; removes what the failed save
    left behind (its temporary directory, orbax threads waiting for it) in a single-process run."""
    directory = checkpoint_dir(workdir)
    number = _errno(error)
    reason = os.strerror(number) if number else _reason(error)
    advice = _advice(number)
    _release_failed_save(directory, step)
    _drop_closed_loop_errors()
    earlier = [s for s in steps(workdir) if step is None or s < step]
    last = f"the last good checkpoint is step {earlier[-1]}" if earlier else "there is no earlier checkpoint"
    what = f"checkpoint step {step}" if step is not None else "a checkpoint"
    if number is None and _lost_peer(error):  # a multi-process save's collective failed: a peer is gone
        return CheckpointError(
            f"process {jax.process_index()} lost a peer process while saving {what} ({reason}); {last}; "
            f"rerun the same command on every host to resume"
        )
    return CheckpointError(f"cannot write {what} to {directory}: {reason}; {advice}; {last}")


def _lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a failed collective of a multi-process run (a peer died or disconnected)."""
    text = str(error)
    return any(s in text for s in ("Gloo", "Connection reset", "Connection refused", "heartbeat", "DEADLINE_EXCEEDED"))


def save(mngr, step: int, state, force: bool = False) -> None:
    """Save ``state`` as checkpoint ``step`` (asynchronously; ``mngr.wait_until_finished`` commits it).

    Raises ``CheckpointError`` (one line) if this save, or the previous one, failed."""
    ocp = _orbax()

    mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def restore_latest(mngr, workdir: str, abstract_state, is_chief: bool = True, barrier: Callable | None = None):
    """Restore the newest intact checkpoint into the shapes/shardings of ``abstract_state``.

    Returns the restored state, or None when the workdir has no checkpoint. A checkpoint that fails to
    restore is moved to ``WORKDIR/checkpoints_damaged/<step>`` (by the chief, after ``barrier``) and the
    next newest is tried, with one warning line naming both steps. Raises ``CheckpointError`` when
    none restores.
    """
    ocp = _orbax()

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

    ocp = _orbax()
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
    if not isinstance(recorded, dict):  # hand-edited or truncated to `[]`, `null`, a number ...
        raise CheckpointError(
            f"{path} holds {short_path(json.dumps(recorded), 40)}, not a config (a JSON object of fields); "
            f"restore it, or use a new --workdir to start fresh"
        )
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
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(_plain(config), f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise CheckpointError(f"cannot write {path} ({e.strerror or e}); {_advice(e.errno)}") from None

