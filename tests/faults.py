"""Test-only callbacks that a config names (with LDM_ALLOW_TARGETS=tests.): fault injection and probes.

They observe or poison real training runs; they never replace the model or the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch


class PoisonBatch(L.Callback):
    """Fills the batch's float tensors with NaN at the given global steps (a corrupt item, a bad latent)."""

    def __init__(self, at_steps: list[int]):
        self.at_steps = set(at_steps)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        """Poison the batch in place when the step is one of ``at_steps``."""
        if trainer.global_step in self.at_steps:
            for value in batch.values():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    value.fill_(float("nan"))


HOLD_S = 180  # the longest a held step waits for the test's signal
HOLD_POLL_S = 0.02


class StepProbe(L.Callback):
    """Appends one JSON line per training batch (step, rank, item paths) and per checkpoint write (rank).

    ``sleep`` slows each step so a test can pick the moment to kill the process. ``hold_at``: at these global steps,
    the first time this rank reaches one (no earlier record of it in ``out``: a run resumed after a kill passes),
    the batch waits — after its record is written — until the process receives SIGTERM (or is killed), at most
    HOLD_S: a test that sees the record signals a run standing exactly there, without slowing every step.
    """

    def __init__(self, out: str, sleep: float = 0.0, hold_at: list[int] = ()):
        self.out, self.sleep, self.hold_at = Path(out), sleep, set(hold_at)

    def _write(self, record: dict) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Record which rank writes each checkpoint file."""
        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint

        def recorded(checkpoint: dict, path: Any, storage_options: Any = None) -> None:
            save(checkpoint, path, storage_options)
            self._write({"event": "save", "rank": trainer.global_rank, "path": Path(path).name})

        io.save_checkpoint = recorded

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        """Record the step and the items of its batch, then wait ``sleep`` seconds (and hold where asked)."""
        step, rank = trainer.global_step, trainer.global_rank
        hold = step in self.hold_at and not any(r["event"] == "batch" and (r["step"], r["rank"]) == (step, rank)
                                                for r in read_probe(self.out))
        paths = list(batch["path"]) if "path" in batch else []
        self._write({"event": "batch", "step": step, "rank": rank, "paths": paths})
        if self.sleep:
            time.sleep(self.sleep)
        deadline = time.monotonic() + HOLD_S
        while hold and not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(HOLD_POLL_S)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record a hash of this rank's weights and EMA weights."""
        state = pl_module.state_dict()
        ema = {k: v for k, v in state.items() if k.startswith("model_ema.")}
        self._write({"event": "end", "rank": trainer.global_rank, "weights": weights_hash(state),
                     "ema": weights_hash(ema) if ema else None})


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """A short hash of a state dict's names and values (0-dim tensors included)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def read_probe(path: Path) -> list[dict]:
    """The records a StepProbe wrote (empty if none yet)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
