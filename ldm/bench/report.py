"""Benchmark rows and their Markdown table and CSV (columns: measurement, ours, theirs, ratio, unit, precision)."""

from __future__ import annotations

import csv
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

COLUMNS = ("measurement", "ours", "theirs", "ratio", "unit", "precision")
SIGNIFICANT = 4  # digits kept for the values in both files


@dataclass(frozen=True)
class Row:
    """One side-by-side measurement; ``ratio`` = ours / theirs (>1: ours is larger, e.g. faster for a rate)."""

    measurement: str
    ours: float
    theirs: float
    unit: str
    precision: str

    @property
    def ratio(self) -> float:
        """ours / theirs (nan when theirs is 0)."""
        return self.ours / self.theirs if self.theirs else math.nan


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "CPU"


def _fmt(value: float) -> str:
    return f"{value:.{SIGNIFICANT}g}"


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """The rows as CSV with a header line of COLUMNS."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for r in rows:
            writer.writerow([r.measurement, _fmt(r.ours), _fmt(r.theirs), _fmt(r.ratio), r.unit, r.precision])


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a GitHub Markdown table (ratio printed as ``1.23×``)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r.measurement, _fmt(r.ours), _fmt(r.theirs), f"{r.ratio:.2f}×", r.unit, r.precision]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(rows: Sequence[Row], path: Path, title: str, preamble: Sequence[str], notes: Sequence[str]) -> None:
    """bench.md: a title, a few lines on the machine and sizes, the table, then notes (goals, checks, causes)."""
    parts = [f"# {title}", "", *preamble, "", markdown_table(rows), ""]
    if notes:
        parts += ["Notes:", "", *[f"- {n}" for n in notes], ""]
    path.write_text("\n".join(parts))
