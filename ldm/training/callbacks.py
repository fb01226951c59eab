"""Lightning plumbing every run shares: atomic checkpoint writes, exact resumption, and a graceful stop that
saves on Ctrl-C / SIGTERM. Only Lightning's public API is used."""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ldm.core.atomic import link_atomic
from ldm.io.checkpoints import load_file, save_torch_atomic
from ldm.io.runs import LAST_CHECKPOINT, PERIODIC_CHECKPOINT_NAME
from ldm.training.csv_logger import RunCSVLogger

RNG_STATES_KEY = "ldm_rng_states"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint through ``ldm.core.atomic``: a kill at any moment leaves the previous file or the
    new one, never a truncated one; a failed write (a full disk) keeps the previous checkpoint.

    ``last.ckpt`` asked for right after the periodic checkpoint of the same step (ModelCheckpoint writes the two
    one after the other) becomes a hard link to that file: the state is serialised and stored once, not twice,
    and ``last.ckpt`` outlives the periodic file when ``keep`` deletes it. Where links fail it is written."""

    def __init__(self) -> None:
        super().__init__()
        self._previous: tuple[int, Path] | None = None  # (global step, file) of the checkpoint written last

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        """Save ``checkpoint`` to ``path`` atomically (or link it to the same step's periodic file)."""
        path, step = Path(path), checkpoint.get("global_step")
        previous, self._previous = self._previous, None
        linked = (previous is not None and previous[0] == step and path.name == LAST_CHECKPOINT
                  and previous[1].parent == path.parent and PERIODIC_CHECKPOINT_NAME.fullmatch(previous[1].name)
                  and link_atomic(previous[1], path))
        if not linked:
            save_torch_atomic(checkpoint, path)
        self._previous = (step, path)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> dict:
        """Load with the weights-only unpickler: a checkpoint that would run code is refused (CheckpointError)."""
        return load_file(path)


def expect_own_checkpoints(ckpt_dir: str | os.PathLike) -> None:
    """A resumed run writes into its own checkpoint folder: Lightning's "exists and is not empty" warning, meant for a
    new run meeting another's files, is ignored for that folder (as Lightning names it: its real path) only."""
    folder = re.escape(os.path.realpath(ckpt_dir))
    warnings.filterwarnings("ignore", message=f"Checkpoint directory {folder} exists and is not empty")


def rng_states() -> dict:
    """The states of Python's, NumPy's and torch's generators as tensors and plain values (weights-only safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what ``rng_states`` captured."""
    random.setstate(tuple(s if not isinstance(s, list) else tuple(s) for s in states["python"]))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeBookkeeping(L.Callback):
    """Makes a resumed run continue where the checkpoint left it: RNG states, data position, metrics rows."""

    def __init__(self) -> None:
        self._rng_states: dict | None = None
        self._flush_pending = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Store the random number generators' states (Lightning's checkpoint does not)."""
        checkpoint[RNG_STATES_KEY] = rng_states()
        self._flush_pending = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        """After a checkpoint, write the buffered metrics rows (Lightning logs a step's row after the step's
        checkpoint), so that a killed run keeps every row older than its last checkpoint."""
        if self._flush_pending:
            self._flush_pending = False
            for logger in trainer.loggers:
                if isinstance(logger, RunCSVLogger) and trainer.is_global_zero:
                    logger.save()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Trim later metrics rows, position the data stream, and keep the RNG states for the first step."""
        step = int(checkpoint.get("global_step", 0))  # the first step the resumed run logs
        for logger in trainer.loggers:
            if isinstance(logger, RunCSVLogger) and trainer.is_global_zero:
                logger.drop_rows_from(step)
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "resume_at"):
            datamodule.resume_at(step * trainer.accumulate_grad_batches, trainer.world_size)
        self._rng_states = checkpoint.get(RNG_STATES_KEY)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Restore the RNG states last, after everything that draws random numbers while setting up."""
        if self._rng_states is not None:
            set_rng_states(self._rng_states)
            self._rng_states = None


def is_last_step(trainer: L.Trainer) -> bool:
    """Whether the step just taken is a step-based run's last (``trainer.max_steps`` reached)."""
    return trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step


class FinalValidation(L.Callback):
    """A step-based run validates at its last step even when ``max_steps`` is not a multiple of
    ``val_check_interval``: Lightning validates after a batch that asks the loop to stop."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """At the last step, ask the loop to stop (it would anyway), which makes it validate first."""
        if is_last_step(trainer):
            trainer.should_stop = True


class GracefulStop(L.Callback):
    """The first Ctrl-C (like SIGTERM) ends the current step, saves ``last.ckpt`` and stops; a second aborts.

    A run that finishes also leaves its final step in ``last.ckpt``.
    """

    def __init__(self, last_checkpoint: str | os.PathLike):
        self.last_checkpoint = Path(last_checkpoint)
        self._previous_handler: Any = None
        self.stopped = False
        self._saved_step = -1
        self._interrupted = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Note the step of every checkpoint written, whoever writes it."""
        self._saved_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A run that ends between periodic checkpoints still leaves its final state in ``last.ckpt``. Lightning's
        ModelCheckpoint (``save_last``) writes it at the end itself when the fit saved nothing (it runs after this
        callback): then once is enough."""
        checkpoint_writes_last = any(callback.save_last for callback in trainer.checkpoint_callbacks)
        if trainer.global_step != self._saved_step and not (checkpoint_writes_last and self._saved_step < 0):
            trainer.save_checkpoint(self.last_checkpoint, weights_only=False)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Turn the first SIGINT into a SIGTERM, which Lightning answers by stopping after the current step."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: Any) -> None:
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted = True
            rank_zero_info("\nStopping after this step and saving a checkpoint (Ctrl-C again to abort)…")
            signal.raise_signal(signal.SIGTERM)

        self._interrupted = False
        self._previous_handler = signal.signal(signal.SIGINT, handler)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Restore the SIGINT handler."""
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """After a graceful stop (never after a crash), write the last checkpoint."""
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.last_checkpoint, weights_only=False)
            self.stopped = True
            rank_zero_info(f"Saved {self.last_checkpoint} at step {trainer.global_step}.")
