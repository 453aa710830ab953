"""Many short ``python -m lbsgd.main`` runs without paying Python's and the libraries' start-up each time.

``python tests/forkrun.py`` imports ``lbsgd.main`` and the libraries a run imports (JAX, TensorFlow,
TFDS, orbax, clu; no JAX backend is started, no device touched), then reads one JSON request per line
on stdin — ``{"argv": [...], "stdout": path, "stderr": path}`` — and answers each with one line,
``{"returncode": int}``. Every request runs in a fresh child forked from that state: the child's
standard output and error go to the given files and it calls ``lbsgd.main.run()`` — the console
script's entry — with ``sys.argv`` set, so flags, validation, the one-line errors and exit statuses
are the real program's. Only the imports are shared; each child parses its flags and starts JAX's
backend (with the inherited ``XLA_FLAGS``) on its own. A run takes ~0.1 s instead of ~1-5 s.

``ForkRunner`` is the test side: ``run(argv) -> subprocess.CompletedProcess``.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile

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
            text=True,
            start_new_session=True,  # its own process group: a timeout stops the server and its child
        )
        self._count = 0

    def run(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run ``lbsgd.main`` with ``argv``; stdout and stderr come back as text, as ``subprocess.run``'s.
        A run longer than ``timeout`` seconds stops the server and raises ``subprocess.TimeoutExpired``."""
        self._count += 1
        out, err = (os.path.join(self._tmp, f"{self._count}.{name}") for name in ("out", "err"))
        self._proc.stdin.write(json.dumps({"argv": list(argv), "stdout": out, "stderr": err}) + "\n")
        self._proc.stdin.flush()
        if not select.select([self._proc.stdout], [], [], timeout)[0]:
            os.killpg(self._proc.pid, signal.SIGKILL)
            raise subprocess.TimeoutExpired(["lbsgd.main", *argv], timeout)
        reply = self._proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"the forkrun server died (exit status {self._proc.wait()})")
        code = json.loads(reply)["returncode"]
        with open(out) as f_out, open(err) as f_err:
            return subprocess.CompletedProcess(["lbsgd.main", *argv], code, f_out.read(), f_err.read())

    def close(self) -> None:
        """Stop the server."""
        self._proc.stdin.close()
        self._proc.wait(timeout=60)


if __name__ == "__main__":
    _serve()
