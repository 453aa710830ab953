"""Every error lbsgd reports to a user, with the exit status its command line gives it.

==================  ======  ===================================================================
exception           status  raised when
==================  ======  ===================================================================
``ConfigError``     2       a config field, flag, layout or workdir is invalid (before compiling)
``LayoutError``     2       k workers cannot be placed on the devices available
``DataError``       2       a dataset cannot be found, loaded or decoded
``CheckpointError`` 2       no checkpoint can be restored, or the workdir holds another run
``WorkdirBusy``     2       another live lbsgd run holds the workdir's lock
``GridError``       2       a malformed ``--grid`` (``lbsgd.sweep``)
``PeerError``       2       a benchmark's peer (the Flax example) cannot be imported
``NonFinite``       3       the loss or a gradient became NaN or infinite
``Interrupted``     128+s   training stopped on signal s after checkpointing (130 SIGINT, 143 SIGTERM)
``RunFailed``       1       a run started by a tool (sweep, compare) failed
``RunStopped``      130/143 a run started by a tool was stopped by a signal
``StaleRun``        2       a tool's run folder holds a run of another config (sweep, compare)
==================  ======  ===================================================================

``str(e)`` is always one line saying what is wrong and how to fix it; the command-line tools print it
as ``lbsgd: error: <message>`` and exit with ``e.exit_code``. This module imports nothing from lbsgd.
"""

from __future__ import annotations

import signal

EXIT_USAGE = 2  # bad input: config, flags, data, workdir, checkpoints
EXIT_NONFINITE = 3  # the run produced a NaN or an infinity
EXIT_FAILED = 1  # a run started by a tool failed
EXIT_STOPPED = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # stopped by Ctrl-C / SIGTERM after checkpointing


class LbsgdError(Exception):
    """An error a user can cause or meet; ``str(e)`` is one line saying what is wrong and how to fix it."""

    exit_code = EXIT_USAGE


class ConfigError(LbsgdError, ValueError):
    """An invalid configuration, flag or workdir, found before anything is compiled."""


class LayoutError(ConfigError):
    """Workers that cannot be placed on the available devices; the message says how to fix it."""


class DataError(LbsgdError, ValueError):
    """A dataset that cannot be loaded or read; one line naming the files and the fix."""


class CheckpointError(LbsgdError):
    """No checkpoint can be restored, or the workdir belongs to another run."""


class WorkdirBusy(LbsgdError):
    """Another live run holds the workdir (``lbsgd.workdir.WorkdirLock``)."""


class GridError(LbsgdError, ValueError):
    """A malformed ``--grid`` of a sweep."""


class PeerError(LbsgdError):
    """A benchmark's peer implementation (the Flax example) could not be found or imported."""


class NonFinite(LbsgdError):
    """The loss or a gradient became NaN or infinite; the state after it was not saved."""

    exit_code = EXIT_NONFINITE

    def __init__(self, step: int, how: str):
        self.step = step
        self.how = how
        super().__init__(f"non-finite loss or gradient at step {step} ({how})")


class Interrupted(LbsgdError):
    """Training stopped on a signal after checkpointing; ``str(e)`` says where and how to resume."""

    def __init__(self, signum: int, step: int, checkpoint_dir: str):
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} after step {step}; checkpoint saved in {checkpoint_dir}; "
            f"rerun the same command to resume"
        )


class RunFailed(LbsgdError, RuntimeError):
    """A run started by a tool exited with an error; one line naming the run, its error and its log."""

    exit_code = EXIT_FAILED


class RunStopped(LbsgdError, RuntimeError):
    """A run started by a tool was stopped by SIGINT or SIGTERM (it saved a checkpoint): stop the whole grid."""

    exit_code = 128 + signal.SIGINT


class StaleRun(LbsgdError):
    """A folder where a tool (sweep, compare) would start or reuse a run holds a run of another config, or one
    that cannot be checked (no config.json); one line naming the folder, the differing fields and the fix."""
