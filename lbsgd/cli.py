"""Command-line helpers shared by lbsgd's tools: bad input is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from lbsgd.errors import EXIT_USAGE


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``prog: error: message``) and exit status 2, no usage dump."""

    def error(self, message):
        """Print one line and exit 2."""
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


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
