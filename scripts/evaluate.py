"""Measure a run's quality: prints a Markdown table and appends its rows to a CSV.

    python scripts/evaluate.py vae --run runs/vae/latest [--n 512] [--split val] [--grid]
    python scripts/evaluate.py adherence --run runs/ldm/latest [--samplers ddim:50,dpmpp_2m:20] [--n 64] [--scale 4]
    python scripts/evaluate.py classes --run runs/ldm/<class-run> [--n 128] [--guide runs/classifier/<run> --guide-scale 2]
    python scripts/evaluate.py fid --run runs/ldm/latest [--n 256]
    python scripts/evaluate.py edges --run runs/controlnet/latest [--n 64]
    python scripts/evaluate.py straightness --run runs/ldm/<flow run> [--n 64] [--steps 50]
    python scripts/evaluate.py all --vae runs/vae/latest --ldm runs/ldm/latest [--class-run R] [--controlnet R] --out results/eval

The CSV defaults to ``<run>/eval.csv`` (``results/eval.csv`` for commands without a run); ``--out DIR`` puts
it in DIR and also writes the table to ``DIR/eval.md``. ``all`` rewrites both with its one gathered table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import NoReturn

from ldm.core.errors import UserError
from ldm.core.logging import setup_cli_logging
from ldm.core.threads import add_threads_argument, apply_threads
from ldm.eval import adherence_eval, class_eval, edges_eval, fid_eval, gather, straightness, vae_recon
from ldm.eval.report import append_csv, markdown_table
from ldm.io.runs import resolve_run

EXIT_BAD_INPUT = 2
RESULTS_CSV = Path("results") / "eval.csv"
RUN_CSV_NAME = "eval.csv"
TABLE_NAME = "eval.md"
HIDDEN_IN_TABLE = ("time", "checkpoint")  # kept in the CSV, too long for the terminal

# Subcommand name → module with `add_arguments(parser)`, `run(args) -> row or rows` and optional `note(row)`.
COMMANDS: dict[str, ModuleType] = {
    "vae": vae_recon,
    "adherence": adherence_eval,
    "classes": class_eval,
    "fid": fid_eval,
    "edges": edges_eval,
    "straightness": straightness,
    "all": gather,
}
FRESH_TABLE = ("all",)  # commands whose table replaces the CSV instead of appending to it


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
        add_threads_argument(child)
        if name not in FRESH_TABLE:  # `all` always writes its own --out/eval.csv afresh
            child.add_argument("--csv", default=None, help=f"CSV to append to (default <run>/{RUN_CSV_NAME} or {RESULTS_CSV})")
            child.add_argument("--out", default=None, help=f"folder for {TABLE_NAME} (and {RUN_CSV_NAME} unless --csv)")
    return parser


def default_csv(args: argparse.Namespace) -> Path:
    """``--out``/eval.csv when given, else ``<run>/eval.csv`` for commands on a run, else ``results/eval.csv``."""
    if getattr(args, "out", None):
        return Path(args.out) / RUN_CSV_NAME
    run = getattr(args, "run", None)
    return resolve_run(run) / RUN_CSV_NAME if run else RESULTS_CSV


def write_outputs(args: argparse.Namespace, rows: list[dict], table: str) -> Path | None:
    """Append (or, for `all`, rewrite) the CSV; write the table to ``--out``/eval.md when --out is given (its path)."""
    if args.command in FRESH_TABLE:
        args.csv.unlink(missing_ok=True)
    for row in rows:
        append_csv(args.csv, row)
    if getattr(args, "out", None):
        md = Path(args.out) / TABLE_NAME
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(table + "\n")
        return md
    return None


def main(argv: Sequence[str] | None = None) -> dict | list[dict]:
    """Parse, run one subcommand, print its table, write its CSV rows; returns the row (or rows)."""
    setup_cli_logging()
    args = build_parser().parse_args(argv)
    module = COMMANDS[args.command]
    try:
        apply_threads(args.threads)
        args.csv = Path(args.csv) if getattr(args, "csv", None) else default_csv(args)
        result = module.run(args)
        rows = [result] if isinstance(result, dict) else list(result)
        table = markdown_table([{k: v for k, v in row.items() if k not in HIDDEN_IN_TABLE} for row in rows])
        md = write_outputs(args, rows, table)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    print(table)
    note = getattr(module, "note", None)
    if note is not None and (line := note(rows[0])):
        print(f"note: {line}")
    print(f"{'written to' if args.command in FRESH_TABLE else 'appended to'} {args.csv}" + (f"; table in {md}" if md else ""))
    return result


if __name__ == "__main__":
    main()
