"""Benchmarks: ``python -m lbsgd.bench <subcommand> [flags]`` (``--help`` after a subcommand lists its flags).

==============  ==================================================================================
subcommand      what it times
==============  ==================================================================================
``allreduce``   ring and halving/doubling allreduce (Goyal et al. §4) against ``lax.psum``
``input``       the tf.data ImageNet input pipeline, images/s total and per host core
``step``        the real train step: images/s, step-time spread, FLOPs, MFU against a peak measured
                in the same run, peak device memory; ``--peer=flax`` times the Flax example beside it
``strategies``  one train step of every registered strategy, relative to allreduce
``workers``     m of Goyal's workers on one device: vmap vs accumulate vs one BN, with peak memory
==============  ==================================================================================

Shared: ``lbsgd.bench.common`` (one JSON writer, median and spread of timed repeats with compilation
timed apart, memory and FLOP helpers). No subcommand imports JAX before parsing its flags, so those that
need simulated CPU devices can still ask XLA for them.
"""

from __future__ import annotations

import sys
from typing import Sequence

from lbsgd.bench import allreduce, step, strategies, workers
from lbsgd.bench import input as input_bench

#: subcommand -> ``main(argv) -> exit status``
SUBCOMMANDS = {
    "allreduce": allreduce.main,
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
