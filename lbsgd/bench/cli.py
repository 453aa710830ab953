"""The dispatcher of ``python -m lbsgd.bench <subcommand> [flags]``: ``SUBCOMMANDS``, ``PARSERS`` and ``main``.

Importing it imports every subcommand module, none of which imports JAX before parsing its flags.
"""

from __future__ import annotations

import sys
from typing import Sequence

from lbsgd import cli
from lbsgd.bench import allreduce, hlo, step, strategies, workers
from lbsgd.bench import input as input_bench
from lbsgd.errors import EXIT_USAGE

#: subcommand -> ``main(argv) -> exit status``
SUBCOMMANDS = {
    "allreduce": allreduce.main,
    "hlo": hlo.main,
    "input": input_bench.main,
    "step": step.main,
    "strategies": strategies.main,
    "workers": workers.main,
}

#: subcommand -> its flags (``make_parser``); each parser's description is what ``bench --help`` lists
PARSERS = {
    "allreduce": allreduce.make_parser,
    "hlo": hlo.make_parser,
    "input": input_bench.make_parser,
    "step": step.make_parser,
    "strategies": strategies.make_parser,
    "workers": workers.make_parser,
}

PROG = "python -m lbsgd.bench"
EXAMPLES = (
    f"{PROG} step --model=resnet8 --model_width=16 --image_size=8 --num_classes=10 --dtype=float32",
    f"{PROG} strategies --repeats=5",
    f"{PROG} allreduce --sizes=64KB,1MB --devices=8 --repeats=5",
)


def make_parser() -> cli.ArgumentParser:
    """The dispatcher's help: one line per subcommand saying what it measures, and examples."""
    width = max(map(len, PARSERS))
    lines = [f"  {name:<{width}}  {make().description}" for name, make in PARSERS.items()]
    return cli.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} <subcommand> [flags]   ({PROG} <subcommand> --help lists a subcommand's flags)",
        description="Benchmarks of lbsgd's train step, its collectives and its input pipeline.\n\nsubcommands:\n"
        + "\n".join(lines),
        examples=EXAMPLES,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m lbsgd.bench <subcommand> [flags]``; returns the exit status (2: bad command line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    valid = ", ".join(SUBCOMMANDS)
    if argv and argv[0] in ("-h", "--help"):
        make_parser().print_help()
        return 0
    if not argv:
        sys.stderr.write(f"{PROG}: error: missing subcommand; valid: {valid} (--help says what each measures)\n")
        return EXIT_USAGE
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        sys.stderr.write(f"{PROG}: error: unknown subcommand {name!r}; valid: {valid}\n")
        return EXIT_USAGE
    return int(SUBCOMMANDS[name](rest) or 0)
