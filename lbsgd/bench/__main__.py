"""``python -m lbsgd.bench <subcommand> [flags]``: see ``lbsgd.bench``."""

import sys

from lbsgd.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
