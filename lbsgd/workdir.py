"""One run per workdir: an exclusive lock on ``WORKDIR/.lbsgd.lock`` for the life of a run.

The lock is an ``fcntl.flock`` on that file, so the kernel releases it when the holding process ends in
any way (a crash, ``kill -9``); the file records the holder (pid, host, start time) for the message a
second run gets. A run that ends cleanly empties the file; one that died leaves its record, and the next
run takes the lock over with a warning naming it. In a multi-process run the chief (process 0) holds it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time

from lbsgd.errors import WorkdirBusy

LOCK_FILE = ".lbsgd.lock"
log = logging.getLogger("lbsgd")


def _describe(holder: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}"


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096).decode("utf-8", "replace").strip()
    try:
        holder = json.loads(raw) if raw else {}
    except ValueError:
        holder = {"pid": "?", "host": "?"}
    return holder if isinstance(holder, dict) else {}


class WorkdirLock:
    """Hold ``WORKDIR/.lbsgd.lock`` exclusively: ``acquire()`` or ``WorkdirBusy``; ``release()`` at the end."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        """Take the lock, or raise ``WorkdirBusy`` (one line naming the live holder). A record left by a run
        that died is taken over with a warning."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise WorkdirBusy(
                f"--workdir={os.path.dirname(self.path)} is in use by another lbsgd run ({_describe(holder)}); "
                f"wait for it to finish or stop it, or use another --workdir"
            ) from None
        previous = _read(fd)
        if previous:
            log.warning("took over the workdir lock of a run that ended without releasing it (%s)", _describe(previous))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        """Empty the record (a clean end) and let the lock go."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None
