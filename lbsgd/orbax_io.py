"""orbax-checkpoint as lbsgd uses it: literal directory names in its globs, and its failures kept to one line.

* ``_orbax()`` imports orbax and makes ``etils.epath``'s glob take the directory part literally
  (``_literal_glob_base``: a workdir named ``lr[0.1]`` otherwise breaks every save silently).
* A failed save or restore leaves orbax threads, coroutines and event loops behind that print tracebacks
  ("Event loop is closed", "coroutine … was never awaited") or wait for minutes; the helpers here keep
  them quiet and release them (``_quiet_save_failures``, ``_quiet_failures``, ``_drop_closed_loop_errors``,
  ``_release_failed_save``), so that the one-line ``CheckpointError`` of ``lbsgd.checkpoint`` is all a
  user sees.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import glob
import logging
import os
import re
import shutil
import sys
import threading
import time
import warnings

log = logging.getLogger("lbsgd")


#: The warning a failed read's un-awaited orbax/tensorstore coroutines give when they are collected.
NEVER_AWAITED = r"coroutine '.*' was never awaited"


def _orbax():
    """``orbax.checkpoint``, with directory names taken literally by its globs (``_literal_glob_base``)."""
    import orbax.checkpoint as ocp

    _literal_glob_base()
    return ocp


def _literal_glob_base() -> None:
    """Make ``etils.epath.Path(d).glob(pattern)`` match ``pattern`` below ``d`` taken literally, as
    ``pathlib.Path.glob`` does, for local paths.

    epath joins ``d`` and ``pattern`` unescaped and hands the whole to ``glob.glob``: below a directory
    named ``lr[0.1]`` (a character class there) orbax's ``ocdbt.process_*`` glob finds nothing, so the save
    skips merging its per-process OCDBT files (warning "No per-process OCDBT checkpoint subdirs found"),
    commits a checkpoint without its root manifest, and every such checkpoint fails to restore; a name
    with ``**`` raises NotImplementedError, one with ``*`` or ``?`` may match other directories. Installed
    once; a no-op if epath's internals are not what this expects."""
    try:
        from etils.epath import gpath
    except ImportError:  # pragma: no cover - orbax depends on etils
        return
    cls = getattr(gpath, "_GPath", None)
    original = getattr(cls, "glob", None)
    if original is None or getattr(original, "_lbsgd_literal_base", False):
        return

    def glob_below(self, pattern: str):
        base = getattr(self, "_path_str", None)
        if getattr(self, "_uri_scheme", "?") is not None or not isinstance(base, str) or glob.escape(base) == base:
            yield from original(self, pattern)  # cloud paths, and local paths without glob characters
            return
        backend, flavour, new = (getattr(self, name, None) for name in ("_backend", "_PATH", "_new"))
        if "**" in pattern or backend is None or flavour is None or new is None:
            yield from original(self, pattern)  # epath refuses recursive patterns (keep its error); or a new epath
            return
        for found in backend.glob(flavour.join(glob.escape(base), pattern)):
            yield new(found)

    glob_below._lbsgd_literal_base = True
    glob_below.__doc__ = original.__doc__
    cls.glob = glob_below


def _errno(error: BaseException) -> int | None:
    """The OS error number behind ``error`` (an ``OSError`` in its chain, or tensorstore's
    ``[os_error_code='N']``), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return error.errno
        text = str(error)
        found = re.search(r"os_error_code='?(\d+)", text)
        if found:
            return int(found.group(1))
        for number in _WRITE_ERRORS:  # TensorFlow's file errors carry only the text
            if os.strerror(number) in text:
                return number
        error = error.__cause__ or error.__context__
    return None


#: OS errors that mean "the file system does not take this write" (not a bug): disk full, quota, read-only,
#: I/O error.
_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


def _advice(number: int | None) -> str:
    """What to do about a write that failed with OS error ``number``."""
    full = number in (errno.ENOSPC, errno.EDQUOT)
    return "free space or use another --workdir" if full else "use another --workdir"


def _single_process() -> bool:
    try:
        import jax

        return jax.process_count() == 1
    except Exception:  # noqa: BLE001 - no backend: nothing else can be writing
        return True


def _release_failed_save(directory: str, step: int | None) -> None:
    """After a failed save (single process only: peers may still be writing): let go orbax's threads that
    wait for a part of it that never comes (a directory that could not be made: they are not daemons, and
    would keep the process alive for orbax's 20-minute barrier timeout), wait (10 s at most) for the rest
    of it to end (orbax reports a failure of one part while others still write), then remove its
    temporary directory, so a full disk gets its space back."""
    if not _single_process():
        return
    try:
        from orbax.checkpoint._src.futures import future as orbax_future
    except ImportError:  # pragma: no cover - another orbax layout: nothing to release
        orbax_future = None
    waiting = getattr(orbax_future, "_SignalingThread", None)
    in_flight = []
    for thread in threading.enumerate():
        if waiting is not None and isinstance(thread, waiting) and thread.is_alive():
            with contextlib.suppress(Exception):  # best effort; main.py leaves with os._exit anyway
                thread._cancelled = True  # its run() returns once its signals arrive
                orbax_future.set_signals(thread._receive_signals, operation_id=thread._operation_id)
            in_flight.append(thread)
        elif thread.name in ("async_save", "save_finalize") and thread.is_alive():  # orbax's save threads
            in_flight.append(thread)
    deadline = time.monotonic() + 10
    with _quiet_failures():  # never-run coroutines of the released threads are collected here, quietly
        for thread in in_flight:
            threading.Thread.join(thread, timeout=max(0.0, deadline - time.monotonic()))
            if waiting is not None and isinstance(thread, waiting) and not thread.is_alive():
                thread._target = None
    if step is not None:
        for path in glob.glob(os.path.join(glob.escape(directory), f"{step}.orbax-checkpoint-tmp*")):
            shutil.rmtree(path, ignore_errors=True)


#: orbax's error logs of a failed save, each re-raised to ``save``/``wait_until_finished`` and reported there
#: in one line by lbsgd: dropped.
_SAVE_FAILURE_LOGS = (
    "_SignalingThread.run() raised",
    "Failed to run",
    "Save Finalize thread",
    "Checkpointer failed",
    "Failed to write metadata",
    "Failed to update metadata",
    ".orbax-checkpoint-tmp",  # anything else about a save in progress
)


class _OrbaxErrors(logging.Filter):
    """On the ``absl`` logger (orbax logs through absl): drop orbax's error records of a failed save (lbsgd
    raises the failure as one line), and keep its other error records as one line without a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop orbax's logs of a failed save (lbsgd reports it in one line); keep every other record."""
        if record.levelno < logging.ERROR or f"{os.sep}orbax{os.sep}" not in (record.pathname or ""):
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: keep it as it is
            return True
        if any(phrase in message for phrase in _SAVE_FAILURE_LOGS):
            return False
        record.msg, record.args = " ".join(message.split())[:300], None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _quiet_save_failures() -> None:
    """Install ``_OrbaxErrors`` on the ``absl`` logger and ``_drop_closed_loop_errors`` (once): a save fails
    in orbax's threads, at any time, so this cannot be scoped like ``_quiet_failures``."""
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxErrors) for f in absl_logger.filters):
        absl_logger.addFilter(_OrbaxErrors())
    _drop_closed_loop_errors()


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

