"""``metrics.csv`` in the run directory: every logged row, rewritten atomically at each flush, kept on resume.

A Lightning ``Logger`` written on its public interface. Rows are buffered and the whole file is rewritten
(``ldm.core.atomic``) every ``flush_every_n_rows`` rows or ``flush_every_seconds``, when a checkpoint is written
and at the end, so a log can be followed while a run trains and a
kill never leaves a torn row. A resumed run reads the file back and drops the rows logged after the
checkpoint it resumes from (``drop_rows_from``), so every step appears once.
"""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path
from typing import Any, Mapping

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from ldm.core.atomic import write_text_atomic

METRICS_FILE = "metrics.csv"
STEP_KEY = "step"
DEFAULT_FLUSH_ROWS = 50
DEFAULT_FLUSH_SECONDS = 30.0


class RunCSVLogger(Logger):
    """Metrics rows (``step`` plus one column per metric) in ``<run_dir>/metrics.csv``."""

    def __init__(self, run_dir: str | os.PathLike, flush_every_n_rows: int = DEFAULT_FLUSH_ROWS,
                 flush_every_seconds: float = DEFAULT_FLUSH_SECONDS):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.flush_every_n_rows, self.flush_every_seconds = flush_every_n_rows, flush_every_seconds
        self.keys, self.rows = self._read()
        self._pending = 0
        self._saved_at = time.monotonic()

    @property
    def name(self) -> str:
        """Runs are named by their directory."""
        return ""

    @property
    def version(self) -> str:
        """Runs are named by their directory."""
        return ""

    @property
    def save_dir(self) -> str:
        """The run directory."""
        return str(self.run_dir)

    @property
    def log_dir(self) -> str:
        """The run directory (where ``metrics.csv`` lives)."""
        return str(self.run_dir)

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        if not self.path.is_file():
            return [STEP_KEY], []
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or [STEP_KEY]), list(reader)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Buffer one row; flush every ``flush_every_n_rows`` rows or ``flush_every_seconds``."""
        row = {k: float(v) for k, v in metrics.items()}
        row[STEP_KEY] = step if step is not None else len(self.rows)
        self.keys += [k for k in row if k not in self.keys]
        self.rows.append(row)
        self._pending += 1
        if self._pending >= self.flush_every_n_rows or time.monotonic() - self._saved_at >= self.flush_every_seconds:
            self.save()

    @rank_zero_only
    def log_hyperparams(self, params: Any = None, *args: Any, **kwargs: Any) -> None:
        """Hyper-parameters live in the run's config.yaml; nothing more to write."""

    @rank_zero_only
    def save(self) -> None:
        """Rewrite ``metrics.csv`` with every row so far."""
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.keys, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.path, text.getvalue())
        self._pending = 0
        self._saved_at = time.monotonic()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Flush at the end of the fit (finished, stopped or failed)."""
        self.save()

    @rank_zero_only
    def drop_rows_from(self, step: int) -> None:
        """Forget rows logged at ``step`` or later (they came after the checkpoint a resumed run starts from)."""
        self.rows = [r for r in self.rows if r.get(STEP_KEY) in (None, "") or int(float(r[STEP_KEY])) < step]
        self.save()
