"""Training progress: Lightning's bar in a terminal, one plain line every so often in a log file or a pipe.

Under ``nohup … > log`` a bar is useless (it is redrawn with ``\\r`` and appears once, at exit), so when stdout is
not a terminal ``LineProgress`` logs lines such as

    step 120/4000 (3%) · epoch 1/12 · train/rec_loss 0.0812 · 3.71 it/s · elapsed 0:00:32 · ETA 0:17:26
    validation at step 500: val/psnr 28.14, val/rec_loss 0.0401

at the first step, every ``every_seconds`` and at the last step. Both show the epoch out of the run's total,
which for a step-based run (``trainer.max_steps``) is the number of epochs those steps take.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

log = logging.getLogger(__name__)
DEFAULT_EVERY_SECONDS = 30.0
VALUE_DIGITS = 4  # significant digits of logged metric values
DEFAULT_MONITOR = "val/loss"  # what "validation stopped improving" watches unless checkpoint.monitor names another


def total_steps(trainer: L.Trainer) -> int | None:
    """The optimiser steps the run will make (max_steps, or epochs × batches per epoch); None when unknown."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        steps = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - Lightning raises several types when it cannot tell
        return None
    return int(steps) if math.isfinite(steps) else None


def total_epochs(trainer: L.Trainer) -> int | None:
    """The epochs the run will go through: max_epochs, or for a step-based run the epochs its steps take."""
    if trainer.max_steps and trainer.max_steps > 0:
        per_epoch = trainer.num_training_batches
        if not per_epoch or not math.isfinite(per_epoch):
            return None
        batches = trainer.max_steps * trainer.accumulate_grad_batches
        return max(1, math.ceil(batches / per_epoch))
    return trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None


def epoch_text(trainer: L.Trainer) -> str:
    """``epoch E/T`` (1-based), or ``epoch E`` when the total is unknown."""
    total = total_epochs(trainer)
    return f"epoch {trainer.current_epoch + 1}" + (f"/{total}" if total else "")


def _format(value: Any) -> str:
    try:
        return f"{float(value):.{VALUE_DIGITS}g}"
    except (TypeError, ValueError):
        return str(value)


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(max(seconds, 0.0))))


class Improvement:
    """Whether a validation metric still improves: its best value and step, and how many validations since."""

    def __init__(self, monitor: str = DEFAULT_MONITOR, mode: str = "min") -> None:
        self.monitor, self.sign = monitor, 1.0 if mode == "min" else -1.0
        self.best: tuple[float, int] | None = None  # (value, step)
        self.since = 0  # validations since the best

    def update(self, metrics: dict, step: int) -> str:
        """Record this validation; the words that say where it stands (empty when the metric is not logged)."""
        if self.monitor not in metrics:
            return ""
        value = float(metrics[self.monitor])
        if self.best is None or self.sign * value < self.sign * self.best[0]:
            self.best, self.since = (value, step), 0
            return f"{self.monitor} best so far"
        self.since += 1
        return (f"{self.monitor} stopped improving: best {_format(self.best[0])} at step {self.best[1]}, "
                f"{self.since} validation{'s' if self.since > 1 else ''} ago")


class StepBar(TQDMProgressBar):
    """Lightning's tqdm bar, its description the epoch out of the run's total (right for step-based runs); a line
    when validation stops improving."""

    def __init__(self, improvement: Improvement | None = None) -> None:
        super().__init__()
        self.improvement = improvement or Improvement()

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        """As Lightning's, then name the epoch out of the total."""
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(epoch_text(trainer).capitalize())

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """As Lightning's, then say so when the monitored metric no longer improves."""
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking:
            words = self.improvement.update(trainer.callback_metrics, trainer.global_step)
            if "stopped" in words:
                log.info("validation at step %d: %s", trainer.global_step, words)


class LineProgress(ProgressBar):
    """One log line at the first step, every ``every_seconds``, at the last step, and after each validation."""

    def __init__(self, every_seconds: float = DEFAULT_EVERY_SECONDS, improvement: Improvement | None = None) -> None:
        super().__init__()
        self.every_seconds = every_seconds
        self.improvement = improvement or Improvement()
        self._enabled = True
        self._start: tuple[float, int] | None = None  # (time, step) of the first logged step: the rate's origin
        self._last_line = 0.0

    def disable(self) -> None:
        """No lines (non-zero ranks, or while Lightning runs a tuner)."""
        self._enabled = False

    def enable(self) -> None:
        """Lines again."""
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Forget an earlier fit's timing."""
        self._start = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Log a line when one is due."""
        if not self._enabled:
            return
        now, step, total = time.monotonic(), trainer.global_step, total_steps(trainer)
        last = total is not None and step >= total
        if self._start is not None and not last and now - self._last_line < self.every_seconds:
            return
        self._last_line = now
        log.info("%s", self.line(trainer, pl_module, now))

    def line(self, trainer: L.Trainer, pl_module: L.LightningModule, now: float) -> str:
        """``step S/T (P%) · epoch E/N · metrics · it/s · elapsed · ETA``."""
        step, total = trainer.global_step, total_steps(trainer)
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}", epoch_text(trainer)]
        parts += [f"{k} {_format(v)}" for k, v in self.get_metrics(trainer, pl_module).items()]
        if self._start is None:
            self._start = (now, step)
            return " · ".join(parts)
        t0, s0 = self._start
        rate = (step - s0) / (now - t0) if now > t0 else 0.0
        parts += [f"{rate:.2f} it/s", f"elapsed {_duration(now - t0)}"]
        if total and rate > 0:
            parts.append(f"ETA {_duration((total - step) / rate)}")
        return " · ".join(parts)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the validation metrics of the step."""
        if not self._enabled or trainer.sanity_checking:
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        text = ", ".join(f"{k} {_format(v)}" for k, v in sorted(metrics.items())) or "done"
        words = self.improvement.update(metrics, trainer.global_step)
        log.info("validation at step %d: %s%s", trainer.global_step, text, f" ({words})" if words else "")


def progress_callback(trainer_cfg: dict, stream: Any = None, monitor: str | None = None,
                      mode: str = "min") -> ProgressBar | None:
    """The bar for a terminal, lines otherwise, each watching ``monitor`` (default val/loss) for improvement; None
    when the config turns progress off."""
    if trainer_cfg.get("enable_progress_bar") is False:
        return None
    stream = sys.stdout if stream is None else stream
    improvement = Improvement(monitor or DEFAULT_MONITOR, mode if monitor else "min")
    return StepBar(improvement) if getattr(stream, "isatty", lambda: False)() else LineProgress(improvement=improvement)
