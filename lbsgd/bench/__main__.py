"""``python -m lbsgd.bench <subcommand> [flags]``: see ``lbsgd.bench``."""

import sys

from lbsgd import cli

if __name__ == "__main__":
    cli.require_train_extra("lbsgd.bench")  # the benchmarks build the trainer's step: lbsgd[train]
    from lbsgd.bench.cli import main

    sys.exit(main())
