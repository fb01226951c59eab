"""Guards that keep a long run from wasting itself: a non-finite loss or gradient never reaches the weights.

Config (top level)::

    guard:
      nonfinite: stop   # stop (default): end the run naming the step and the last good checkpoint
                        # skip: drop that optimiser step (no update, no optimiser state change), count it
                        # off: no checks

The check runs in ``on_before_optimizer_step``, after the gradients exist and before the optimiser uses
them, so it covers automatic optimisation and the VAE's manual optimisation (its ``opt.step()`` and the
uncounted discriminator step both pass through the precision plugin that calls this hook). Whatever the
mode, a checkpoint whose weights are not finite is never written: the save itself is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ldm.core.errors import UserError
from ldm.core.private_api import foreach_norm
from ldm.io.runs import LAST_CHECKPOINT

NonFiniteMode = Literal["stop", "skip", "off"]
GUARD_DEFAULTS: dict[str, Any] = {"nonfinite": "stop"}
SKIPPED_METRIC = "guard/skipped_steps"
MAX_NAMED_TENSORS = 3


class NonFiniteError(UserError, RuntimeError):
    """Training produced a NaN or infinite loss, gradient or weight."""


def nonfinite_grads(optimizer: torch.optim.Optimizer) -> bool:
    """True when any gradient the optimiser would use holds a NaN or an infinity (one device sync)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return False
    norms = foreach_norm(grads)
    return not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold a NaN or an infinity (masks that are meant to
    hold −∞, like a text encoder's causal mask, are non-persistent buffers: not in the state dict)."""
    return [name for name, t in state.items()
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def last_good_checkpoint(ckpt_dir: Path) -> str:
    """The newest checkpoint in ``ckpt_dir`` (``last.ckpt`` before the periodic file it is a hard link to, whichever
    order the filesystem lists them in), or a note that there is none yet."""
    found = ckpt_dir.glob("*.ckpt") if ckpt_dir.is_dir() else []
    newest = max(found, key=lambda p: (p.stat().st_mtime, p.name == LAST_CHECKPOINT), default=None)
    return str(newest) if newest is not None else f"none yet in {ckpt_dir}"


class NonFiniteGuard(L.Callback):
    """Stops the run, or skips the optimiser step, when the loss or the gradients are not finite."""

    def __init__(self, mode: NonFiniteMode = "stop", ckpt_dir: str | os.PathLike = "checkpoints"):
        if mode not in ("stop", "skip", "off"):
            raise ValueError(f"guard.nonfinite must be stop, skip or off, got {mode!r}")
        self.mode, self.ckpt_dir = mode, Path(ckpt_dir)
        self.skipped: list[int] = []

    def _uses_grad_scaler(self, trainer: L.Trainer) -> bool:
        """fp16 training's GradScaler skips inf steps itself (and expects some): leave those to it."""
        return getattr(trainer.precision_plugin, "scaler", None) is not None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Check the gradients; stop, or drop them so the optimiser leaves its parameters untouched."""
        if self.mode == "off" or self._uses_grad_scaler(trainer) or not nonfinite_grads(optimizer):
            return
        step = trainer.global_step
        for group in optimizer.param_groups:  # torch optimisers skip parameters without a gradient
            for p in group["params"]:
                p.grad = None
        if self.mode == "stop":
            raise NonFiniteError(
                f"non-finite loss or gradients at step {step}: run stopped, no weights were updated or saved; "
                f"last good checkpoint: {last_good_checkpoint(self.ckpt_dir)} (set guard.nonfinite=skip to "
                f"skip such steps, or lower the learning rate)")
        if not self.skipped or self.skipped[-1] != step:  # the VAE's two optimisers share one step
            self.skipped.append(step)
            rank_zero_warn(f"non-finite loss or gradients at step {step}: step skipped "
                           f"({len(self.skipped)} so far)")
            if trainer.logger is not None and trainer.is_global_zero:
                trainer.logger.log_metrics({SKIPPED_METRIC: float(len(self.skipped))}, step=step)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Refuse to write a checkpoint whose weights are not finite (it would replace a good one)."""
        if self.mode == "off":
            return
        # a sharded strategy gathers the weights on rank 0, leaving the others an empty state dict: check what is saved
        bad = nonfinite_tensors(checkpoint["state_dict"] if "state_dict" in checkpoint else pl_module.state_dict())
        if bad:
            more = f" and {len(bad) - MAX_NAMED_TENSORS} more" if len(bad) > MAX_NAMED_TENSORS else ""
            raise NonFiniteError(
                f"weights became non-finite by step {trainer.global_step} ({', '.join(bad[:MAX_NAMED_TENSORS])}"
                f"{more}): checkpoint not written; last good checkpoint: {last_good_checkpoint(self.ckpt_dir)}")

    def state_dict(self) -> dict[str, Any]:
        """The steps skipped so far (kept across resumes)."""
        return {"skipped": list(self.skipped)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the skipped-step record."""
        self.skipped = list(state_dict.get("skipped", []))


def guard_callbacks(cfg: dict, ckpt_dir: Path) -> list[L.Callback]:
    """The guard callbacks a config's top-level ``guard:`` section asks for."""
    options = {**GUARD_DEFAULTS, **(cfg.get("guard") or {})}
    return [NonFiniteGuard(options["nonfinite"], ckpt_dir)]
