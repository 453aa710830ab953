"""Command-line helpers shared by lbsgd's tools: one convention for every flag and every error.

* Flags are spelled with underscores (``--per_worker_batch_size``); an older spelling can stay as a
  hidden alias (``ArgumentParser.add_alias``), accepted but not shown.
* Every flag has a help text, and ``--help`` shows its default (``HelpFormatter``).
* Every tool's ``--help`` ends with an ``examples:`` section of real command lines
  (``ArgumentParser(examples=...)``).
* Bad input is one line on stderr, ``prog: error: message``, and exit status 2 (``EXIT_USAGE``).
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import sys
from typing import Callable, Sequence

from lbsgd.errors import EXIT_USAGE


# What the trainer and the tools built on it import beyond the light install (jax, flax, optax, numpy):
# setup.cfg's [train] extra, by import name.
TRAIN_EXTRA = ("ml_collections", "tensorflow", "tensorflow_datasets", "clu", "orbax.checkpoint", "sklearn")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module blocked in sys.modules
        return False


def require_train_extra(prog: str) -> None:
    """Exit with one line (status 2) when the trainer's packages are missing: ``pip install lbsgd`` alone
    installs only what the optax pieces and the models need, and ``prog`` needs ``lbsgd[train]``."""
    missing = [name.split(".")[0] for name in TRAIN_EXTRA if not _importable(name)]
    if missing:
        sys.stderr.write(
            f"{prog}: error: the trainer's packages are not installed ({', '.join(missing)}); "
            "install them with: pip install 'lbsgd[train]' (from a clone: pip install -e '.[train]')\n"
        )
        sys.exit(EXIT_USAGE)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Description and epilog kept as written (examples stay one per line); every option that takes a
    value shows its default, unless its help already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.nargs == 0 or action.required or action.default is argparse.SUPPRESS:
            return text  # positionals, switches (off unless given), required flags and hidden aliases
        if "default" in text.lower():
            return text
        if action.default is None or action.default == "" or action.default == []:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


def examples_epilog(examples: Sequence[str], before: str = "") -> str:
    """The ``examples:`` section of a tool's help: each command line on its own, indented line."""
    lines = [before, ""] if before else []
    return "\n".join([*lines, "examples:", *(f"  {e}" for e in examples)])


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``prog: error: message``) and exit status 2, no usage dump.

    ``examples``: real command lines, shown under ``examples:`` at the end of ``--help`` (after any
    ``epilog``) and kept in ``self.examples`` (the tests parse each one). ``aliases``: hidden spelling ->
    the option it stands for (``add_alias``)."""

    def __init__(self, *args, examples: Sequence[str] = (), **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        self.examples = tuple(examples)
        if self.examples:
            kwargs["epilog"] = examples_epilog(self.examples, kwargs.get("epilog") or "")
        self.aliases: dict[str, str] = {}
        super().__init__(*args, **kwargs)

    def error(self, message):
        """Print one line and exit 2."""
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)

    def add_alias(self, alias: str, option: str) -> None:
        """Accept ``alias`` as another spelling of ``option`` (an older command line), hidden from --help."""
        target = next(a for a in self._actions if option in a.option_strings)
        self.add_argument(alias, dest=target.dest, type=target.type, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.aliases[alias] = option


def override_problem(config, args: Sequence[str]) -> str | None:
    """The first ``--config.<path>=<value>`` of ``args`` naming no field of ``config`` (a ``ConfigDict``):
    one line with the closest field (``difflib``, as ``lbsgd.config.validate.check_fields`` suggests one),
    or None when every override names a field. ml_collections' own message for it spans two lines."""
    for arg in args:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config.") :].split("=", 1)[0].split(".")
        node = config
        for i, part in enumerate(path):
            if not hasattr(node, "keys"):
                return (
                    f"config field {'.'.join(path[:i])!r} holds a value ({type(node).__name__}), not a section of "
                    f"fields: there is no {'.'.join(path[: i + 1])!r}; --print_config lists the fields"
                )
            if part not in node:
                close = difflib.get_close_matches(part, sorted(node.keys()), n=1)
                if close:
                    hint = f"did you mean {'.'.join([*path[:i], close[0]])!r}?"
                else:
                    hint = f"{path[i - 1]} has: {', '.join(node.keys())}" if i else "--print_config lists the fields"
                return f"unknown config field {'.'.join(path[: i + 1])!r} ({hint})"
            node = node[part]
    return None


def add_run_flags(ap: argparse.ArgumentParser, *, workdir: str, workdir_help: str, cpu_devices: int) -> None:
    """The flags shared by the tools that run ``lbsgd.main`` once per folder (``sweep``, ``compare``):
    ``--config``, ``--workdir``, ``--override`` and ``--cpu_devices``."""
    ap.add_argument("--config", required=True, metavar="PATH", help="an experiments/*.py config file (required)")
    ap.add_argument("--workdir", metavar="DIR", default=workdir, help=workdir_help)
    ap.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a config override for every run, without --config., e.g. --override=num_epochs=10 (repeatable)",
    )
    ap.add_argument(
        "--cpu_devices",
        type=int,
        metavar="N",
        default=cpu_devices,
        help="simulated CPU devices per run; 0 = leave as is",
    )


def positive(kind: Callable = int) -> Callable[[str], object]:
    """An argparse ``type`` that converts with ``kind`` and rejects values <= 0."""

    def convert(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its message
    return convert


def port(text: str) -> int:
    """An argparse ``type``: a TCP port number, 0 (pick a free one) to 65535."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text}")
    return value


port.__name__ = "port"
