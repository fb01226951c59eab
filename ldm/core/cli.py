"""The light half of the command lines: arguments every stage and script shares, defined without importing torch
or Lightning, so that ``--help`` and a bad argument answer at once (the heavy imports wait until after parsing)."""

from __future__ import annotations

import argparse

AUTO = "auto"
OMP_ENV = "OMP_NUM_THREADS"  # honoured when neither --threads nor the config's `threads:` is given
THREADS_HELP = (f"torch CPU threads: a number, or {AUTO!r}: the cores the load average leaves free, at least 1 "
                f"(default: the config's `threads:`, else ${OMP_ENV}, else {AUTO})")
SCRIPT_THREADS_HELP = (f"torch CPU threads: a number, or {AUTO!r}: the cores the load average leaves free, at least 1 "
                       f"(default: ${OMP_ENV}, else {AUTO})")


def add_threads_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, from_config: bool = False) -> None:
    """The ``--threads`` option every stage and script shares (``from_config``: the command also reads a config's
    ``threads:``, as the training stages do)."""
    parser.add_argument("--threads", default=None, metavar="N", help=THREADS_HELP if from_config else SCRIPT_THREADS_HELP)


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is a script's docstring (its first line, then its examples, as written)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
