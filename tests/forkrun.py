"""Many short ``python -m lbsgd.main`` runs without paying Python's and the libraries' start-up each time.

``python tests/forkrun.py`` imports ``lbsgd.main`` and the libraries a run imports (JAX, TensorFlow,
TFDS, orbax, clu; no JAX backend is started, no device touched), then reads one JSON request per line
on stdin — ``{"argv": [...], "stdout": path, "stderr": path}`` — and answers each with two lines,
``{"pid": int}`` when it starts and ``{"returncode": int}`` when it ends. Every request runs in a fresh child forked from that state: the child's
standard output and error go to the given files and it calls ``lbsgd.main.run()`` — the console
script's entry — with ``sys.argv`` set, so flags, validation, the one-line errors and exit statuses
are the real program's. Only the imports are shared; each child parses its flags and starts JAX's
backend (with the inherited ``XLA_FLAGS``) on its own. A run takes ~0.1 s instead of ~1-5 s.

``ForkRunner`` is the test side: ``run(argv) -> subprocess.CompletedProcess``, or ``start(argv)`` -> a
``ForkedRun`` to signal (kill tests) and ``poll``/``wait`` like ``subprocess.Popen``.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

PRELOAD = ("jax", "tensorflow", "tensorflow_datasets", "orbax.checkpoint", "clu.metric_writers", "lbsgd.validate",
           "lbsgd.train", "lbsgd.data.pipeline")  # what a run imports; none of them starts a JAX backend
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _serve() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    sys.path.insert(0, REPO)
    for name in PRELOAD:
        importlib.import_module(name)
    from lbsgd import main

    answer = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: one lbsgd.main run
            code = 1
            try:
                for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
                    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(target, fd)
                    os.close(target)
                sys.stdin.close()
                sys.argv = ["lbsgd.main", *request["argv"]]
                main.run()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - an uncaught error is the program's: show its traceback
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        answer.write(json.dumps({"pid": pid}) + "\n")
        answer.flush()
        _, status = os.waitpid(pid, 0)
        answer.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        answer.flush()


class ForkRunner:
    """A ``forkrun`` server of the test session's environment; ``run`` is one ``lbsgd.main`` run."""

    def __init__(self, env: dict | None = None):
        self._tmp = tempfile.mkdtemp(prefix="lbsgd-forkrun-")
        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)],
            cwd=REPO,
            env=dict(os.environ, **(env or {})),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,  # replies are read with os.read: a line Python buffered would be invisible to select
            start_new_session=True,  # its own process group: a timeout stops the server and its child
        )
        self._count = 0
        self._buffer = b""
        self._active = None

    def start(self, *argv: str, stdout: str | None = None, stderr: str | None = None) -> "ForkedRun":
        """Start ``lbsgd.main`` with ``argv`` and return at once (one run at a time per server); its output
        goes to the files ``stdout`` / ``stderr`` (default: files of the server's own)."""
        if self._active is not None:  # one run at a time: its exit status is the next reply
            self._active.wait()
        self._count += 1
        out = stdout or os.path.join(self._tmp, f"{self._count}.out")
        err = stderr or os.path.join(self._tmp, f"{self._count}.err")
        self._proc.stdin.write((json.dumps({"argv": list(argv), "stdout": out, "stderr": err}) + "\n").encode())
        self._active = ForkedRun(self, ["lbsgd.main", *argv], int(self._reply(60)["pid"]), out, err)
        return self._active

    def run(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run ``lbsgd.main`` with ``argv``; stdout and stderr come back as text, as ``subprocess.run``'s.
        A run longer than ``timeout`` seconds stops the server and raises ``subprocess.TimeoutExpired``."""
        started = self.start(*argv)
        started.wait(timeout)
        return started.completed()

    def _reply(self, timeout: float | None) -> dict | None:
        """The server's next line, or None if none came within ``timeout`` seconds (None: wait)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            if deadline is not None and not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the forkrun server died (exit status {self._proc.wait()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        """Stop the server and remove the runs' output files."""
        self._proc.stdin.close()
        self._proc.wait(timeout=60)
        shutil.rmtree(self._tmp, ignore_errors=True)



class ForkedRun:
    """A started run: ``pid`` (signal it with ``os.kill``), ``poll()``, ``wait()``, like ``subprocess.Popen``."""

    def __init__(self, runner: ForkRunner, args: list, pid: int, stdout: str, stderr: str):
        self._runner, self.args, self.pid, self._out, self._err = runner, args, pid, stdout, stderr
        self.returncode = None

    def poll(self) -> int | None:
        """The exit status if the run has ended, else None."""
        if self.returncode is None:
            reply = self._runner._reply(0)
            if reply is not None:
                self.returncode = reply["returncode"]
        return self.returncode

    def wait(self, timeout: float = 300) -> int:
        """Wait for the end and return the exit status; after ``timeout`` seconds stop the server and raise
        ``TimeoutExpired``."""
        if self.returncode is None:
            reply = self._runner._reply(timeout)
            if reply is None:
                os.killpg(self._runner._proc.pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = reply["returncode"]
        return self.returncode

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the run's process."""
        os.kill(self.pid, signum)

    def completed(self) -> subprocess.CompletedProcess:
        """The ended run as ``subprocess.run`` returns it (stdout and stderr as text)."""
        with open(self._out) as f_out, open(self._err) as f_err:
            return subprocess.CompletedProcess(self.args, self.returncode, f_out.read(), f_err.read())


if __name__ == "__main__":
    _serve()
