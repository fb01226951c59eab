"""Measure a run's quality: prints a Markdown table and appends a row to a CSV.

    python scripts/evaluate.py vae --run runs/vae/latest [--n 512] [--split val] [--grid]
    python scripts/evaluate.py vae --run runs/vae/latest --csv results/eval.csv

The CSV defaults to ``<run>/eval.csv`` (``results/eval.csv`` for commands without a run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn, Sequence

from ldm.errors import UserError
from ldm.eval import vae_recon
from ldm.eval.report import append_csv, markdown_table
from ldm.runs import resolve_run

EXIT_BAD_INPUT = 2
RESULTS_CSV = Path("results") / "eval.csv"
RUN_CSV_NAME = "eval.csv"
HIDDEN_IN_TABLE = ("time", "checkpoint")  # kept in the CSV, too long for the terminal

# Subcommand name → module with `add_arguments(parser)`, `run(args) -> dict row` and optional `note(row)`.
# The sampling-based measures (`adherence`, `edges`, `classes`, `fid`) join here once ldm.pipeline can
# sample from a run; their measures are ready in ldm.eval.measures and ldm.eval.shapes_reader.
COMMANDS: dict[str, ModuleType] = {
    "vae": vae_recon,
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one `error: …` line (exit 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subparser per entry of COMMANDS, plus the shared --csv."""
    parser = _Parser(prog="evaluate.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, module in COMMANDS.items():
        child = sub.add_parser(name, help=(module.__doc__ or "").splitlines()[0], description=module.__doc__)
        module.add_arguments(child)
        child.add_argument("--csv", default=None, help=f"CSV to append to (default <run>/{RUN_CSV_NAME} or {RESULTS_CSV})")
    return parser


def default_csv(args: argparse.Namespace) -> Path:
    """``<run>/eval.csv`` for commands on a run, else ``results/eval.csv``."""
    run = getattr(args, "run", None)
    return resolve_run(run) / RUN_CSV_NAME if run else RESULTS_CSV


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse, run one subcommand, print its table, append its CSV row; returns the row."""
    args = build_parser().parse_args(argv)
    module = COMMANDS[args.command]
    try:
        args.csv = Path(args.csv) if args.csv else default_csv(args)
        row = module.run(args)
        append_csv(args.csv, row)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    print(markdown_table([{k: v for k, v in row.items() if k not in HIDDEN_IN_TABLE}]))
    note = getattr(module, "note", None)
    if note is not None and (line := note(row)):
        print(f"note: {line}")
    print(f"appended to {args.csv}")
    return row


if __name__ == "__main__":
    main()
