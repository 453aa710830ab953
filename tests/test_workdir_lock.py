"""One run per workdir: the lock's refusal, release and take-over, in one process (flock is per open file)."""

import json
import logging
import os
import subprocess
import sys

import pytest

from lbsgd import errors
from lbsgd.workdir import LOCK_FILE, WorkdirLock


def test_a_held_lock_refuses_a_second_holder_until_released(tmp_path):
    first = WorkdirLock(str(tmp_path)).acquire()
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid()
    with pytest.raises(errors.WorkdirBusy) as e:
        WorkdirLock(str(tmp_path)).acquire()
    assert f"is in use by another lbsgd run (pid {os.getpid()} on host" in str(e.value) and "\n" not in str(e.value)
    first.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""
    WorkdirLock(str(tmp_path)).acquire().release()  # free again


def test_the_lock_of_a_killed_holder_is_taken_over_with_a_warning(tmp_path, caplog):
    """A holder that dies (here: a child process that takes the lock and exits without releasing) leaves its
    record; the kernel released the flock, so the next run takes it over and names the dead holder."""
    code = f"from lbsgd.workdir import WorkdirLock; WorkdirLock({str(tmp_path)!r}).acquire(); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    dead = json.loads((tmp_path / LOCK_FILE).read_text())
    with caplog.at_level(logging.WARNING, logger="lbsgd"):
        lock = WorkdirLock(str(tmp_path)).acquire()
    assert f"pid {dead['pid']} on host" in caplog.text and "ended without releasing it" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
