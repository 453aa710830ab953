r"""Start a multi-process run on this machine: ``python -m lbsgd.launch --num_processes=2 --devices_per_process=4 -- <lbsgd.main args>``.

Each process is ``python -m lbsgd.main <args> --coordinator_address=127.0.0.1:PORT --num_processes=P
--process_id=i`` with ``devices_per_process`` simulated CPU devices (JAX multi-controller with gloo
CPU collectives), exactly as one process per host would run on a cluster. Output is streamed with a
``[pI]`` prefix. If any process fails, the others are stopped and the launcher exits with the
failing process's status (or 1).

On a real cluster run the same ``lbsgd.main`` command once per host instead (see README, "Scaling
out"); this launcher is for trying multi-process layouts on one machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from lbsgd import cli
from lbsgd.errors import EXIT_USAGE


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str, out, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            out.write(f"{prefix} {line}")
            out.flush()
    stream.close()


EXAMPLES = (
    "python -m lbsgd.launch -- --config=experiments/digits.py --workdir=runs/digits_2x4",
    "python -m lbsgd.launch --num_processes=4 --devices_per_process=2 -- --config=experiments/digits.py "
    "--workdir=runs/digits_4x2 --config.num_workers=16",
    "python -m lbsgd.launch --num_processes=2 --port=29500 -- --config=experiments/digits.py --workdir=runs/d "
    "--config.strategy=dpsgd",
)


def make_parser() -> cli.ArgumentParser:
    """The launcher's own flags (those before ``--``; what follows ``--`` goes to every lbsgd.main)."""
    p = cli.ArgumentParser(
        prog="python -m lbsgd.launch",
        usage="%(prog)s [--num_processes P] [--devices_per_process D] [--port PORT] [--heartbeat_timeout_s S] "
        "-- <lbsgd.main flags>",
        description="Start a multi-process lbsgd.main run on this machine: P processes of D simulated CPU devices "
        "each.\n\n" + __doc__.split("\n\n")[1],
        examples=EXAMPLES,
    )
    p.add_argument("--num_processes", type=cli.positive(int), default=2, metavar="P", help="processes to start")
    p.add_argument(
        "--devices_per_process",
        type=cli.positive(int),
        default=4,
        metavar="D",
        help="simulated CPU devices in each process",
    )
    p.add_argument(
        "--port", type=cli.port, default=0, metavar="PORT", help="coordinator port on 127.0.0.1; 0 = pick a free one"
    )
    p.add_argument(
        "--heartbeat_timeout_s",
        type=cli.positive(int),
        default=60,
        metavar="S",
        help="seconds without a peer's heartbeat before a process exits",
    )
    return p


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        i = argv.index("--")
        own, main_args = argv[:i], argv[i + 1 :]
    else:
        own, main_args = argv, []
    return make_parser().parse_args(own), main_args


def _error(msg: str) -> int:
    print(f"lbsgd.launch: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    """Run the processes; returns the exit status (0 only if every process succeeded)."""
    args, main_args = _parse(sys.argv[1:] if argv is None else argv)
    if not main_args:
        return _error(
            "no lbsgd.main arguments; usage: python -m lbsgd.launch --num_processes=2 -- "
            "--config=experiments/digits.py --workdir=runs/x"
        )
    if args.port and not port_is_free(args.port):
        return _error(
            f"port {args.port} on 127.0.0.1 is already in use; pass another --port or --port=0 to pick a free one"
        )
    port = args.port or free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
        + [f"--xla_force_host_platform_device_count={args.devices_per_process}"]
    )
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONUNBUFFERED"] = "1"
    procs, pumps, lock = [], [], threading.Lock()
    for i in range(args.num_processes):
        cmd = [
            sys.executable,
            "-m",
            "lbsgd.main",
            *main_args,
            f"--coordinator_address=127.0.0.1:{port}",
            f"--num_processes={args.num_processes}",
            f"--process_id={i}",
            f"--heartbeat_timeout_s={args.heartbeat_timeout_s}",
        ]
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        procs.append(proc)
        t = threading.Thread(target=_pump, args=(proc.stdout, f"[p{i}]", sys.stdout, lock), daemon=True)
        t.start()
        pumps.append(t)
    status = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, status = failed[0]
                with lock:
                    print(
                        f"lbsgd.launch: process {i} exited with status {status}; stopping the others", file=sys.stderr
                    )
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        status = 130
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.time() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for t in pumps:
            t.join(timeout=5)
    return status if status >= 0 else 1


if __name__ == "__main__":
    sys.exit(main())
