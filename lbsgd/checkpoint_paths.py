"""Where a run's checkpoints go, and whether they can be written there: checked before anything compiles.

``check_dir`` refuses, in one line (``CheckpointError``), a workdir whose path is too long for the longest
file a checkpoint writes below it (``CHECKPOINT_PATH_RESERVE``), or whose ``checkpoints`` is not a
writable directory.
"""

from __future__ import annotations

import os

from lbsgd.errors import CheckpointError


#: The longest path a checkpoint writes below the workdir, measured (strace of a save, orbax 0.12.8): the
#: data files of a save in progress, ``checkpoints/<step>.orbax-checkpoint-tmp/default.orbax-checkpoint-tmp/
#: ocdbt.process_<i>/d/<32 hex>``; here with room for a 10-digit step and a 5-digit process index. Every
#: other file lbsgd writes there (config.json, results.json, TensorBoard events, checkpoints_damaged/...)
#: is shorter.
CHECKPOINT_PATH_RESERVE = len(
    os.path.join(
        "",
        "checkpoints",
        "9" * 10 + ".orbax-checkpoint-tmp",
        "default.orbax-checkpoint-tmp",
        "ocdbt.process_99999",
        "d",
        "f" * 32,
    )
)


def checkpoint_dir(workdir: str) -> str:
    """``WORKDIR/checkpoints`` (absolute)."""
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def short_path(path: str, limit: int = 120) -> str:
    """``path``, its middle elided when longer than ``limit`` characters (a message stays readable)."""
    return path if len(path) <= limit else f"{path[: limit // 2]}...{path[-(limit // 3) :]}"


def _limit(path: str, name: str, default: int) -> int:
    """``os.pathconf`` of the nearest existing directory above ``path`` (``default`` where unknown)."""
    probe = path
    while probe and not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        value = os.pathconf(probe or os.sep, name)
    except (OSError, ValueError):
        return default
    return value if value and value > 0 else default


def path_problem(workdir: str) -> str | None:
    """Why checkpoints cannot be written below ``workdir`` because of its length, or None.

    A name longer than the file system's ``NAME_MAX`` bytes, or a path that with the longest file a
    checkpoint writes below it (``CHECKPOINT_PATH_RESERVE`` bytes) reaches ``PATH_MAX`` bytes (the
    terminating NUL included), fails at the first save otherwise. Lengths are in bytes of the file
    system encoding (a non-ASCII character takes several)."""
    path = os.path.abspath(os.path.expanduser(workdir))
    name_max = _limit(path, "PC_NAME_MAX", 255)
    for name in path.split(os.sep):
        size = len(os.fsencode(name))
        if size > name_max:
            return (
                f"--workdir={short_path(path)} has a {size}-byte directory name ({short_path(name, 40)}); this file system "
                f"allows at most {name_max} bytes per name; use a shorter --workdir"
            )
    path_max = _limit(path, "PC_PATH_MAX", 4096)
    size, longest = len(os.fsencode(path)), path_max - 1 - CHECKPOINT_PATH_RESERVE
    if size > longest:
        return (
            f"--workdir={short_path(path)} is {size} bytes long; checkpoint files add up to {CHECKPOINT_PATH_RESERVE} "
            f"bytes below it and a path may have at most {path_max - 1} bytes; use a --workdir of at most "
            f"{longest} bytes"
        )
    return None


def _kind(path: str) -> str:
    if os.path.islink(path) and not os.path.exists(path):
        return "a broken symbolic link"
    return "a regular file" if os.path.isfile(path) else "a special file"


#: The directories of a workdir lbsgd writes checkpoints to, and what each holds.
_DIRS = {
    "checkpoints": "this run's checkpoints",
    "checkpoints_damaged": "checkpoints that fail to restore, moved aside",
}


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_dir(workdir: str) -> None:
    """Refuse, in one line (``CheckpointError``), a workdir whose checkpoints cannot be written: a path too
    long for them (``path_problem``), ``checkpoints`` or ``checkpoints_damaged`` that exists and is not a
    directory, or a ``checkpoints`` directory that is not writable. Nothing is created here."""
    problem = path_problem(workdir)
    if problem:
        raise CheckpointError(problem)
    root = os.path.abspath(workdir)
    for name, holds in _DIRS.items():
        path = os.path.join(root, name)
        if os.path.lexists(path) and not os.path.isdir(path):
            raise CheckpointError(
                f"{short_path(path)} is {_kind(path)}, not a directory ({name}/ holds {holds}); move it away or "
                f"use another --workdir"
            )
    directory = checkpoint_dir(workdir)
    # access(2), not a test file: another process may be listing the steps in there (a multi-process run)
    if os.path.isdir(directory) and not os.access(directory, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(directory) else "permission denied"
        raise CheckpointError(
            f"cannot write checkpoints to {short_path(directory)} ({reason}); make it writable or use another --workdir"
        )

