"""Evaluation results as a Markdown table (for the terminal) and rows appended to a CSV (for history)."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Mapping

from ldm.core.atomic import write_text_atomic
from ldm.core.errors import UserError

FLOAT_DIGITS = 4


class EvalError(UserError, ValueError):
    """An evaluation that cannot run on what it was given (wrong kind of run, bad sample count, ...)."""


def format_value(value: object) -> str:
    """Floats with FLOAT_DIGITS decimals (inf/nan spelled out), everything else as str."""
    if isinstance(value, float):
        return str(value) if not math.isfinite(value) else f"{value:.{FLOAT_DIGITS}f}"
    return str(value)


def markdown_table(rows: list[Mapping[str, object]]) -> str:
    """Rows of the same keys → a Markdown table (header, separator, one line per row)."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(format_value(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def append_csv(path: str | os.PathLike, row: Mapping[str, object]) -> Path:
    """Append `row` to a CSV, writing the header first; a row with new columns rewrites the file with the union."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {k: format_value(v) for k, v in row.items()}
    if path.is_file() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            if set(values) <= set(header):
                rows = None
            else:
                rows = list(reader)
        if rows is None:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=header).writerow(values)
            return path
        header += [k for k in values if k not in header]
        _write_all(path, header, [*rows, values])
        return path
    _write_all(path, list(values), [values])
    return path


def _write_all(path: Path, header: list[str], rows: list[Mapping[str, str]]) -> None:
    """Write a whole CSV via a temporary file and rename."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=header, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())
