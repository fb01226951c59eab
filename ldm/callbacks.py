"""Lightning plumbing every run shares: atomic checkpoint writes, a CSV log that survives resume,
and a graceful stop that saves on Ctrl-C / SIGTERM."""

from __future__ import annotations

import csv
import io
import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ldm.checkpoints import fsync_replace


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, fsyncs it and renames it into place.

    A kill at any moment leaves either the previous file or the new one, never a truncated one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        """Save ``checkpoint`` to ``path`` atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
        fsync_replace(tmp, path)


class _AppendingWriter(_ExperimentWriter):
    """Lightning's CSV writer, but a resumed run appends to ``metrics.csv`` instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def drop_rows_from(self, step: int) -> None:
        """Forget rows logged at ``step`` or later (they came after the checkpoint we resume from)."""
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            keys, rows = list(reader.fieldnames or []), list(reader)
        kept = [r for r in rows if not r.get("step") or int(float(r["step"])) < step]
        tmp = Path(self.metrics_file_path).with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.metrics_file_path)


class RunCSVLogger(CSVLogger):
    """CSV metrics written straight into the run directory as ``metrics.csv``."""

    def __init__(self, run_dir: str | os.PathLike, flush_logs_every_n_steps: int = 50):
        super().__init__(save_dir=str(run_dir), name="", version="", flush_logs_every_n_steps=flush_logs_every_n_steps)

    @property
    def experiment(self) -> _AppendingWriter:
        """The writer (created on first use)."""
        if self._experiment is None:
            os.makedirs(self.log_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def log_hyperparams(self, params: Any = None) -> None:
        """Hyper-parameters live in the run's config.yaml; nothing more to write."""


class ResumeBookkeeping(L.Callback):
    """On resume, trims metrics rows newer than the checkpoint so ``metrics.csv`` has no duplicates."""

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Drop rows logged after the checkpoint was written."""
        step = int(checkpoint.get("global_step", 0))  # the first step the resumed run logs
        for logger in trainer.loggers:
            if isinstance(logger, RunCSVLogger) and trainer.is_global_zero:
                logger.experiment.drop_rows_from(step)


class GracefulStop(L.Callback):
    """The first Ctrl-C (like SIGTERM) ends the current step, saves ``last.ckpt`` and stops; a second aborts."""

    def __init__(self, last_checkpoint: str | os.PathLike):
        self.last_checkpoint = Path(last_checkpoint)
        self._previous_handler: Any = None
        self.stopped = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Route the first SIGINT to Lightning's graceful SIGTERM path."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: Any) -> None:
            if trainer._signal_connector.received_sigterm:
                raise KeyboardInterrupt
            rank_zero_info("\nStopping after this step and saving a checkpoint (Ctrl-C again to abort)…")
            trainer._signal_connector.received_sigterm = True

        self._previous_handler = signal.signal(signal.SIGINT, handler)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Restore the SIGINT handler."""
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """After a graceful stop (never after a crash), write the last checkpoint."""
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.last_checkpoint)
            self.stopped = True
            rank_zero_info(f"Saved {self.last_checkpoint} at step {trainer.global_step}.")
