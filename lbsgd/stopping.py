"""What SIGINT (Ctrl-C) and SIGTERM do to a single-process run, in its three phases.

* **Before the first step** (loading, validating, compiling): the run ends at once with one line,
  ``lbsgd: stopped by SIGINT before the first step; rerun the same command to start or resume``, and
  exit status 128 + the signal (130, 143) — the same status as a stop during training. Nothing of the
  run is half-written then: a checkpoint is only written by the loop, and config.json atomically.
* **Training**: the loop finishes the current step, checkpoints it and stops (``Interrupted``: "stopped
  by SIGINT after step N; checkpoint saved in …"); a second Ctrl-C stops at once, keeping the last
  committed checkpoint.
* **Finishing** (the final checkpoint and results.json after the last step): the signal is noted and
  the run completes first (a few seconds).

Multi-process runs leave SIGTERM to JAX's preemption sync point, which stops every process at the same
step; the handlers here are for a run with one process.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

log = logging.getLogger("lbsgd")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _say_and_exit(message: str, code: int, cleanup=()) -> None:
    for release in cleanup:
        release()
    print(f"lbsgd: {message}", file=sys.stderr, flush=True)
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)


class StopRequest:
    """The signal policy of one run; ``phase`` is 'setup', 'training' or 'finishing'."""

    def __init__(self):
        self.phase = "setup"
        self.signum: int | None = None
        self.installed = False
        self.cleanup: list = []  # called before an immediate exit (e.g. releasing the workdir lock)
        self._previous: dict = {}

    def install(self) -> bool:
        """Take over SIGINT and SIGTERM (main thread only); returns whether it did."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return False
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self.installed = True
        return True

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self.installed = False

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.phase == "setup":
            message = f"stopped by {name} before the first step; rerun the same command to start or resume"
            _say_and_exit(message, 128 + signum, self.cleanup)
        if self.phase == "training" and self.signum is not None and signum == signal.SIGINT:
            _say_and_exit(
                f"stopped at once by a second {name}; the last committed checkpoint stands; rerun the same command "
                f"to resume from it",
                128 + signum,
                self.cleanup,
            )
        self.signum = signum
        if self.phase == "training":
            log.warning("%s received: stopping after this step with a checkpoint", name)
        else:
            log.warning("%s received: finishing the final checkpoint and results.json first", name)


STOP = StopRequest()  # the process's one policy: lbsgd.main installs it first thing, the loop moves its phase
