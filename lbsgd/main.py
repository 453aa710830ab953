r"""Train k workers x n examples: ``python -m lbsgd.main --config=experiments/digits.py --workdir=runs/digits``.

The ``lbsgd`` console script is the same command as ``python -m lbsgd.main``. Any config field can be
overridden: ``--config.num_workers=16``, ``--config.easgd.beta=0.5``; ``--print_config`` lists every
field with its value and meaning, and exits without training. Rerunning the same command on the
same workdir resumes from the latest checkpoint. Bad input exits with status 2 and one line on
stderr saying what is wrong and how to fix it.

Multi-process (one process per host, JAX multi-controller): pass ``--coordinator_address``,
``--num_processes`` and ``--process_id``, or ``--distributed=auto`` where JAX detects the cluster
(SLURM, Open MPI, TPU pods).
"""

from __future__ import annotations

import logging
import os
import sys
import textwrap

from lbsgd import cli

cli.require_train_extra("lbsgd")  # before the trainer's packages are imported: one line, not a traceback

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lbsgd import errors, runs  # noqa: E402
from lbsgd import workdir as workdir_lib
from lbsgd.stopping import STOP

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an experiments/*.py config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and results.json.")
flags.DEFINE_bool(
    "print_config",
    False,
    "Print every config field (after the --config.<field> overrides) with its value and meaning, then exit "
    "without training; --workdir is not needed.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.", lower_bound=0)
flags.DEFINE_enum("distributed", "off", ["off", "auto"], "'auto': jax.distributed.initialize() detects the cluster.")
flags.DEFINE_integer(
    "heartbeat_timeout_s", 60, "Multi-process: seconds without a peer's heartbeat before exiting.", lower_bound=1
)
flags.DEFINE_integer("init_timeout_s", 120, "Multi-process: seconds to wait for every process to join.", lower_bound=1)
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.", lower_bound=1)

EXIT_USAGE = errors.EXIT_USAGE  # bad input: config, flags, data, workdir, checkpoints
#: lbsgd.main's own flags, in the order ``--help`` lists them (absl's own: ``--helpfull``)
OWN_FLAGS = ("config", "workdir", "print_config", "coordinator_address", "num_processes", "process_id",
             "distributed", "heartbeat_timeout_s", "init_timeout_s")  # fmt: skip
HELP_FLAGS = ("-h", "--help", "-?")  # --helpshort and --helpfull stay absl's
EXAMPLES = (
    "python -m lbsgd.main --config=experiments/digits.py --workdir=runs/digits",
    "lbsgd --config=experiments/digits.py --workdir=runs/digits_k16 --config.num_workers=16 --config.warmup=none",
    "python -m lbsgd.main --config=experiments/digits.py --print_config --config.strategy=easgd "
    "--config.easgd.period=10",
)


def quiet_native_logs() -> None:
    """Keep TensorFlow's C++ start-up notices (oneDNN, CPU features) off stderr.

    tf.data is only used for decoding and augmentation here; oneDNN's reordered float math in TF ops
    is turned off so that preprocessing is bit-reproducible.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def fail(message: str, code: int = EXIT_USAGE, now: bool = False) -> None:
    """Print ``lbsgd: error: <message>`` on stderr (one line) and exit with ``code`` (2: bad input).

    ``now``: leave without interpreter teardown (``leave``): once JAX, tf.data and orbax have started
    threads, their teardown can print errors ("Event loop is closed" tracebacks from a failed
    checkpoint read) or abort in C++ ("terminate called without an active exception"), which would
    bury the one line and change the exit status.
    """
    print(f"lbsgd: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    if now:
        leave(code, together=False)
    sys.exit(code)


def leave(code: int, together: bool = True) -> None:
    """Exit with ``code`` now, without interpreter teardown, after flushing logs and output.

    Called once training has committed everything worth keeping (checkpoints, events, results.json)
    or failed after committing it. Tearing down JAX's, TensorFlow's and orbax's native state takes
    about a second on CPU (1.2 s of a 14 s short run, measured) and can abort in C++; none of it
    writes anything. ``together`` (every process ends here at the same step: finished, or stopped
    together by a signal): a multi-process run first leaves ``jax.distributed``, whose shutdown waits
    for every process, so no process outlives the coordinator its peers still talk to. A failure of
    one process does not wait for the others.
    """
    if together and "jax" in sys.modules:
        import jax

        try:
            jax.distributed.shutdown()  # a no-op unless this is a multi-process run
        except Exception:  # noqa: BLE001 - a peer already gone: leave anyway, with our own status
            pass
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in ``argv`` (absl accepts both), or None."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def usage() -> str:
    """``--help``: what ``lbsgd.main`` does, its flags with their defaults, and examples."""
    lines = [
        "usage: python -m lbsgd.main --config=<experiments/*.py> --workdir=<dir> [--config.<field>=<value> ...] "
        "[flags]",
        "       lbsgd [the same flags]",
        "",
        __doc__.strip(),
        "",
        "flags:",
    ]
    for name in OWN_FLAGS:
        flag = FLAGS[name]
        default = "none" if flag.default is None else flag.default
        lines.append(f"  --{name}")
        text = f"{flag.help} (default: {default})"
        lines.append(textwrap.fill(text, 100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    lines += [
        "  --config.<field>=<value>",
        "      override one field of the config file (a strategy's option: --config.easgd.beta=0.5); "
        "--print_config lists them",
        "  --helpfull",
        "      every flag, absl's and JAX's too",
        "",
        cli.examples_epilog(EXAMPLES),
    ]
    return "\n".join(lines)


def _unknown_field(config_path: str, argv: list[str], error: Exception) -> str:
    """The one line for a KeyError or AttributeError of loading the config with its overrides: the override
    naming no field and the closest field (ml_collections' own message spans lines, quoted twice), or what
    went wrong in the config file itself."""
    try:
        config = runs.load_config(config_path.split(":", 1)[0])
    except Exception as e:  # noqa: BLE001 - an error inside the user's config file
        return f"--config file {config_path!r} failed to load: {type(e).__name__}: {e}"
    found = cli.override_problem(config, argv)
    return found or f"--config file {config_path!r} failed to load: {type(error).__name__}: {error}"


def parse_flags(argv: list[str]) -> list[str]:
    """Parse flags; a bad flag, missing/unreadable config file or unknown override exits 2 with one line.
    ``--help`` prints ``usage()`` and exits 0."""
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(usage())
        sys.exit(0)
    config_path = _flag_value(argv, "config")
    if config_path is not None and not os.path.isfile(config_path.split(":", 1)[0]):
        fail(f"--config file {config_path!r} does not exist; pass --config=<path to an experiments/*.py file>")
    try:
        rest = FLAGS(argv)
        FLAGS.config  # ml_collections defers load errors to the first access  # noqa: B018
    except flags.Error as e:
        fail(f"{e}; see --help for the flags")
    except (KeyError, AttributeError) as e:
        fail(_unknown_field(config_path, argv, e))
    except (ValueError, TypeError) as e:
        fail(f"bad --config override: {e}; check the value's type against {config_path}")
    except OSError as e:
        fail(
            f"--config file {config_path!r} cannot be loaded ({str(e).splitlines()[0]}); pass a valid "
            f"experiments/*.py file"
        )
    except Exception as e:  # noqa: BLE001 - an error inside the user's config file
        fail(f"--config file {config_path!r} failed to load: {type(e).__name__}: {e}")
    return rest


def config_lines(config) -> list[str]:
    """``--print_config``: ``name = value  # meaning`` per field (``lbsgd.config.schema.FIELDS``, in its
    order); a strategy's options as ``section.option = value`` under a comment line saying what they are."""
    from lbsgd import strategies
    from lbsgd.config import schema

    docs = {f.name: f.doc for f in schema.FIELDS}
    for entry in strategies.REGISTRY.values():
        if entry.section and entry.section not in docs:
            about = " ".join((entry.options.__doc__ or "").split("\n\n")[0].split()).replace("``", "").rstrip(".")
            about = about.removeprefix(f"config.{entry.section}:").strip()
            users = [e.name for e in strategies.REGISTRY.values() if e.section == entry.section]
            docs[entry.section] = f"config.{entry.section}, options of strategy {' / '.join(users)}: {about}"
    keys = list(config.keys())
    rows = []  # (name, value, meaning); name None: a section's comment line
    for name in [n for n in schema.names() if n in keys] + [n for n in keys if n not in schema.names()]:
        value = config[name]
        if isinstance(value, ml_collections.ConfigDict):
            rows.append((None, docs.get(name, f"config.{name}"), ""))
            rows += [(f"{name}.{key}", v, "") for key, v in value.items()]
        else:
            rows.append((name, value, docs.get(name, "")))
    width = max(len(name) for name, _, _ in rows if name)
    return [
        f"# {value}" if name is None else f"{name:<{width}} = {value!r}" + (f"  # {doc}" if doc else "")
        for name, value, doc in rows
    ]


def init_distributed() -> None:
    """Join a multi-process run when asked to (before any JAX device is touched)."""
    import jax

    if FLAGS.coordinator_address or FLAGS.num_processes:
        if not (FLAGS.coordinator_address and FLAGS.num_processes and FLAGS.process_id is not None):
            fail("multi-process runs need all of --coordinator_address, --num_processes and --process_id")
        jax.distributed.initialize(
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            initialization_timeout=FLAGS.init_timeout_s,
            heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_s,
        )
    elif FLAGS.distributed == "auto":
        jax.distributed.initialize()


class _QuietLibraries(logging.Filter):
    """Drop INFO chatter of orbax/tfds (they log every save step at INFO); keep warnings and errors."""

    NOISY = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/")

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep warnings and errors, and INFO records not from the noisy libraries."""
        return record.levelno >= logging.WARNING or not any(s in record.pathname for s in self.NOISY)


def quiet_logging() -> None:
    """Keep lbsgd's and clu's progress lines, silence libraries' INFO logs."""
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    handler.addFilter(_QuietLibraries())
    for h in logging.getLogger().handlers:
        h.addFilter(_QuietLibraries())


def check_backend() -> None:
    """JAX's devices start, or ``ConfigError`` (one line) saying which setting asks for what is not here."""
    import jax

    try:
        jax.devices()
    except (RuntimeError, AssertionError) as e:  # JAX's own errors for a backend it cannot start
        reason = (str(e).splitlines() or ["no such device here"])[0].split(" (set JAX_PLATFORMS")[0].split(" (you may")[0]
        platforms = os.environ.get("JAX_PLATFORMS", "")
        if "--xla_force_host_platform_device_count=0" in os.environ.get("XLA_FLAGS", "").split():
            raise errors.ConfigError(
                "XLA_FLAGS asks for --xla_force_host_platform_device_count=0 CPU devices; give a count >= 1 or drop "
                "the flag"
            ) from None
        if platforms:
            raise errors.ConfigError(
                f"JAX_PLATFORMS={platforms!r} asks for a backend this machine cannot start ({reason or 'no such device'}); "
                f"unset JAX_PLATFORMS to use what is here, or install JAX for the accelerator "
                f"(pip install -U 'jax[cuda12]' for NVIDIA GPUs, 'jax[tpu]' for TPUs)"
            ) from None
        raise errors.ConfigError(f"JAX cannot start a backend ({reason}); check the JAX installation") from None


def prepare(config, workdir: str):
    """Everything before training that can fail on the user's input: the config, the workdir, the noise
    scale to read, the cluster, the backend and the layout. Returns (workdir, lock or None)."""
    from lbsgd.config import validate

    validate.check_config(config)
    workdir = validate.check_workdir(workdir)  # absolute, "~" expanded
    b_noise = validate.resolve_b_noise(config)
    logging.getLogger("lbsgd").setLevel(logging.INFO)
    quiet_logging()
    if b_noise is not None:
        logging.getLogger("lbsgd").info("saturating learning-rate rule with the measured noise scale B_noise = %.1f", b_noise)
    init_distributed()
    check_backend()

    import jax

    validate.check_layout(config, jax.device_count(), jax.process_count())
    lock = workdir_lib.WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
    if lock is not None:
        STOP.cleanup.append(lock.release)  # a stop before the first step leaves the workdir free too
    return workdir, lock


def main(argv) -> None:
    """absl entry point: validate, then ``lbsgd.trainer.train.train_and_evaluate``; every failure is one line."""
    del argv
    config = FLAGS.config
    if config is None:
        fail("--config is required; e.g. --config=experiments/digits.py")
    if FLAGS.print_config:
        print("\n".join(config_lines(config)), flush=True)
        return  # nothing trained, no workdir touched: exit status 0
    try:
        workdir, lock = prepare(config, FLAGS.workdir)
    except errors.LbsgdError as e:
        fail(str(e), code=e.exit_code)

    from lbsgd.trainer import train

    code, message = 0, ""
    try:
        train.train_and_evaluate(config, workdir)
    except errors.Interrupted as e:
        code, message = e.exit_code, f"lbsgd: {e}"
    except errors.NonFinite as e:
        code = e.exit_code
        message = (
            f"lbsgd: error: {e}; lower the learning rate or set --config.on_nonfinite=skip, then rerun the same "
            f"command (it resumes from the last good checkpoint, or starts afresh if there is none)"
        )
    except errors.LbsgdError as e:
        code, message = e.exit_code, f"lbsgd: error: {e}"
    except Exception as e:  # noqa: BLE001 - a run's own file (events, results.json) the file system refused
        from lbsgd import checkpoint

        failure = checkpoint.write_failure(workdir, e)
        if failure is None:
            raise
        code, message = failure.exit_code, f"lbsgd: error: {failure}"
    if lock is not None:
        lock.release()
    if message:
        print(" ".join(message.split()), file=sys.stderr, flush=True)
    # Finished, or stopped by a signal (every process at the same step): leave together; a failure does not wait.
    leave(code, together=code in (0, *errors.EXIT_STOPPED))


def _die_with_parent() -> None:
    """Linux: the trainer gets SIGKILL if its supervisor dies (no orphaned trainers holding ports)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def supervise(argv: list[str]) -> int:
    """Run this command as a child process and explain its death in one line.

    In a multi-process run a dead peer makes the collectives' C++ runtime abort the survivors
    (or JAX's heartbeat terminates them after --heartbeat_timeout_s); neither can be caught in
    Python. The parent, which imports nothing heavy, reports it and keeps the exit status non-zero.
    """
    import signal
    import subprocess

    env = dict(os.environ, LBSGD_SUPERVISED="1")
    child = subprocess.Popen([sys.executable, "-m", "lbsgd.main", *argv[1:]], env=env, preexec_fn=_die_with_parent)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    code = child.wait()
    explained = (0, EXIT_USAGE, errors.EXIT_NONFINITE, *errors.EXIT_STOPPED)  # the trainer said why
    if code not in explained:
        from lbsgd import checkpoint  # imports JAX: only once the child has failed (the supervisor stays light)

        pid = _flag_value(argv, "process_id")
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        if code < 0 and -code == signal.SIGABRT:
            how += " (collective runtime abort: a peer process died or disconnected)"
        print(
            f"lbsgd: error: process {pid} {how}; last checkpoint: {checkpoint.describe_latest(_flag_value(argv, 'workdir'))}; "
            f"rerun the same command on every host to resume",
            file=sys.stderr,
            flush=True,
        )
        return 1 if code < 0 else code
    return code


def run() -> None:
    """Console-script entry (``lbsgd``)."""
    quiet_native_logs()
    multi = any(a.startswith(("--coordinator_address", "--num_processes", "--distributed=auto")) for a in sys.argv)
    if multi and not os.environ.get("LBSGD_SUPERVISED"):
        sys.exit(supervise(sys.argv))
    if not multi:
        STOP.install()  # Ctrl-C / SIGTERM from here on: one line and 130 / 143 (lbsgd.stopping)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
