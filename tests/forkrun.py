"""Many short ``python -m lbsgd.main`` runs without paying Python's and the libraries' start-up each time.

``python tests/forkrun.py`` imports ``lbsgd.main`` and the libraries a run imports (JAX, TensorFlow,
TFDS, orbax, clu; no JAX backend is started, no device touched), then reads one JSON request per line
on stdin — ``{"argv": [...], "stdout": path, "stderr": path, "env": {...}}`` — and starts each in a
fresh child forked from that state, answering ``{"pid": int}`` at once and ``{"pid": int,
"returncode": int}`` when the child ends; several runs may be under way at once (the processes of a
multi-process run). The child sets ``env`` in its environment, sends its standard output and error to
the given files and calls ``lbsgd.main.run()`` — the console script's entry — with ``sys.argv`` set,
so flags, validation, the one-line errors and exit statuses are the real program's. Only the imports
are shared; each child parses its flags and starts JAX's backend on its own (reading ``XLA_FLAGS``, so
``env`` may set its simulated device count). Variables the libraries read when imported (``JAX_*``,
``TF_*``) are the server's, from the environment it started with; ``env`` only reaches what is read later
(``XLA_FLAGS``, ``LBSGD_SUPERVISED``). A run takes ~0.1 s to start instead of ~1-5 s.

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


def _child(request: dict, main) -> None:
    """In the forked child: one ``lbsgd.main`` run as ``request`` asks; never returns."""
    code = 1
    try:
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        sys.stdin.close()
        os.environ.update(request.get("env") or {})
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


def _serve() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    sys.path.insert(0, REPO)
    for name in PRELOAD:
        importlib.import_module(name)
    from lbsgd import main

    def answer(reply: dict) -> None:
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()

    running, pending, closed = set(), b"", False
    while not closed or running:
        if not closed and select.select([sys.stdin], [], [], 0.02 if running else None)[0]:
            chunk = os.read(sys.stdin.fileno(), 65536)
            closed = not chunk
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(json.loads(line), main)
                running.add(pid)
                answer({"pid": pid})
        elif closed:
            time.sleep(0.02)
        for pid in list(running):
            ended, status = os.waitpid(pid, os.WNOHANG)
            if ended:
                running.discard(pid)
                answer({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)})


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
            start_new_session=True,  # its own process group: a timeout stops the server and its children
        )
        self._count = 0
        self._buffer = b""
        self._ended = {}  # pid -> exit status, as the server reported them

    def start(self, *argv: str, stdout: str | None = None, stderr: str | None = None,
              env: dict | None = None) -> "ForkedRun":
        """Start ``lbsgd.main`` with ``argv`` (and ``env`` added to its environment) and return at once; its
        output goes to the files ``stdout`` / ``stderr`` (default: files of the server's own)."""
        self._count += 1
        out = stdout or os.path.join(self._tmp, f"{self._count}.out")
        err = stderr or os.path.join(self._tmp, f"{self._count}.err")
        request = {"argv": list(argv), "stdout": out, "stderr": err, "env": dict(env or {})}
        self._proc.stdin.write((json.dumps(request) + "\n").encode())
        while True:
            reply = self._reply(60)
            if reply is None:
                raise RuntimeError("the forkrun server did not start a run within 60 s")
            if "returncode" not in reply:
                return ForkedRun(self, ["lbsgd.main", *argv], int(reply["pid"]), out, err)

    def run(self, *argv: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run ``lbsgd.main`` with ``argv``; stdout and stderr come back as text, as ``subprocess.run``'s.
        A run longer than ``timeout`` seconds stops the server and raises ``subprocess.TimeoutExpired``."""
        started = self.start(*argv, env=env)
        started.wait(timeout)
        return started.completed()

    def _reply(self, timeout: float | None) -> dict | None:
        """The server's next line, or None if none came within ``timeout`` seconds (None: wait); an exit
        status is also kept in ``_ended``."""
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
        reply = json.loads(line)
        if "returncode" in reply:
            self._ended[int(reply["pid"])] = int(reply["returncode"])
        else:  # a new run: an earlier, reaped run may have had the same pid
            self._ended.pop(int(reply["pid"]), None)
        return reply

    def _status(self, pid: int, timeout: float | None) -> int | None:
        """The exit status of run ``pid``, waiting up to ``timeout`` seconds (0: only what has arrived)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while pid not in self._ended:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._reply(left) is None:
                return None
        return self._ended[pid]

    def dead(self) -> bool:
        """True once the server has exited (``kill``, or a crash)."""
        return self._proc.poll() is not None

    def kill(self) -> None:
        """Stop the server and every run it started, now (SIGKILL to its process group)."""
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """Stop the server (after its runs end) and remove the runs' output files."""
        if not self.dead():
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
            self.returncode = self._runner._status(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float = 300) -> int:
        """Wait for the end and return the exit status; after ``timeout`` seconds stop the server and its
        runs and raise ``TimeoutExpired``."""
        if self.returncode is None:
            self.returncode = self._runner._status(self.pid, timeout)
            if self.returncode is None:
                self._runner.kill()
                raise subprocess.TimeoutExpired(self.args, timeout)
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
