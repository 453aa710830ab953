"""The dispatcher of ``python -m lbsgd.bench <subcommand> [flags]``: ``SUBCOMMANDS`` and ``main``.

Importing it imports every subcommand module, none of which imports JAX before parsing its flags.
"""

from __future__ import annotations

import sys
from typing import Sequence

from lbsgd.bench import allreduce, hlo, step, strategies, workers
from lbsgd.bench import input as input_bench

#: subcommand -> ``main(argv) -> exit status``
SUBCOMMANDS = {
    "allreduce": allreduce.main,
    "hlo": hlo.main,
    "input": input_bench.main,
    "step": step.main,
    "strategies": strategies.main,
    "workers": workers.main,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m lbsgd.bench <subcommand> [flags]``; returns the exit status (2: bad command line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    valid = ", ".join(SUBCOMMANDS)
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: python -m lbsgd.bench <subcommand> [flags]\nsubcommands: {valid}")
        return 0
    if not argv:
        sys.stderr.write(f"python -m lbsgd.bench: error: missing subcommand; valid: {valid}\n")
        return 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        sys.stderr.write(f"python -m lbsgd.bench: error: unknown subcommand {name!r}; valid: {valid}\n")
        return 2
    return int(SUBCOMMANDS[name](rest) or 0)
