"""Sample grids written while training, as callbacks: the systems draw nothing and write no files themselves.

    callbacks:
      - {target: ldm.training.samples.SampleGrid, params: {every_n_steps: 1000, conditions: [a red circle …]}}

``SampleGrid`` (stage 2) draws the configured prompts or labels with the EMA weights through the Pipeline, the
one sampling path (a run on aspect-ratio buckets: one row per bucket size, widest to tallest, each on a white box);
``ControlSampleGrid`` (stage 3) draws the batch's hints (hint | generated | target rows) every
N training steps and on the first validation batch; ``ReconstructionGrid`` (stage 1) puts a training batch above
its reconstructions. Grids land in the run's ``samples/`` folder (``<name>-step<N>.png`` and a ``.txt`` legend).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch

from ldm.core.atomic import write_text_atomic
from ldm.core.images import image_grid, save_image_atomic
from ldm.inference.pipeline import Pipeline
from ldm.io.runs import SAMPLES_DIR
from ldm.systems.latents import cache_meta
from ldm.training.callbacks import is_last_step

SAMPLE_SEED = 0
MAX_COLUMNS = 8
GRID_BUCKETS = 3  # a bucketed run's grid: its widest, squarest and tallest buckets
PAD_VALUE = 1.0  # white, in [-1, 1]


def grid_sizes(buckets: list[list[int]], count: int = GRID_BUCKETS) -> list[tuple[int, int]]:
    """Up to ``count`` bucket sizes (h, w) spread from the widest to the tallest (the list runs that way)."""
    if len(buckets) <= count:
        return [tuple(b) for b in buckets]
    return [tuple(buckets[round(i * (len(buckets) - 1) / (count - 1))]) for i in range(count)]


def pad_to(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, C, h, w) centred on a white (B, C, height, width) box: sizes side by side, none stretched."""
    top, left = (height - images.shape[-2]) // 2, (width - images.shape[-1]) // 2
    out = images.new_full((*images.shape[:-2], height, width), PAD_VALUE)
    out[..., top:top + images.shape[-2], left:left + images.shape[-1]] = images
    return out


def grid_path(trainer: L.Trainer, name: str) -> Path:
    """``<run>/samples/<name>.png``."""
    return Path(trainer.default_root_dir) / SAMPLES_DIR / f"{name}.png"


def _due(trainer: L.Trainer, every: int) -> bool:
    """Every ``every`` steps and at the run's last step (rank zero only)."""
    return bool(every) and (trainer.global_step % every == 0 or is_last_step(trainer)) and trainer.is_global_zero


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` training steps, one image per condition (prompt or label), EMA weights, seed 0."""

    def __init__(self, every_n_steps: int, conditions: Sequence[str | int], steps: int = 50, guidance: float = 4.0,
                 sampler: str = "ddim", sizes: Sequence[Sequence[int]] | None = None):
        if not conditions:
            raise ValueError("conditions is empty: give the prompts (or class labels) to draw")
        self.every_n_steps, self.conditions = every_n_steps, list(conditions)
        self.steps, self.guidance, self.sampler = steps, guidance, sampler
        self.sizes = [tuple(s) for s in sizes] if sizes else None  # (h, w) rows; None: the buckets', or the run's

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Draw the grid when the step is due."""
        if _due(trainer, self.every_n_steps) and pl_module.first_stage_model is not None:
            self.draw(trainer, pl_module)

    @torch.no_grad()
    def draw(self, trainer: L.Trainer, system: L.LightningModule) -> Path:
        """Write ``samples/ldm-step<N>.png`` and its legend."""
        was_training = system.training
        system.eval()
        buckets = (cache_meta(trainer).get("buckets") or {}).get("sizes")
        sizes = self.sizes or (grid_sizes(buckets) if buckets else [(None, None)])
        with system.ema_weights():
            pipe = Pipeline.from_system(system)
            rows = [pipe.generate_tensors(self.conditions, steps=self.steps, guidance=self.guidance,
                                          sampler=self.sampler, seed=SAMPLE_SEED, height=h, width=w)
                    for h, w in sizes]  # (n, 3, h, w) each
        system.train(was_training)
        height, width = max(r.shape[-2] for r in rows), max(r.shape[-1] for r in rows)
        rows = [pad_to(r, height, width) for r in rows]
        out = grid_path(trainer, f"ldm-step{trainer.global_step:07d}")
        save_image_atomic(image_grid(rows, ncol=min(len(rows[0]), MAX_COLUMNS)), out)
        names = getattr(system.cond_stage_model, "class_names", None)  # a class run on folders: their names
        legend = [f"{c} {names[c]}" if names and isinstance(c, int) else str(c) for c in self.conditions]
        if self.sizes or buckets:
            legend.append("rows (width×height): " + ", ".join(f"{w}×{h}" for h, w in sizes))
        write_text_atomic(out.with_suffix(".txt"), "\n".join(legend) + "\n")
        return out


class ControlSampleGrid(L.Callback):
    """A ControlNet's hints, samples and targets: ``count`` rows of the training batch every ``every_n_steps``
    steps (EMA weights when kept) and of the first validation batch."""

    def __init__(self, every_n_steps: int = 0, count: int = 4, steps: int = 50, guidance: float = 4.0,
                 sampler: str = "ddim"):
        self.every_n_steps, self.count = every_n_steps, count
        self.steps, self.guidance, self.sampler = steps, guidance, sampler

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Draw the training batch's grid when the step is due."""
        if _due(trainer, self.every_n_steps):
            with pl_module.ema_weights():
                self.draw(trainer, pl_module, batch, "train")

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        """Draw the first validation batch (validation already runs with the EMA weights)."""
        if batch_idx == 0 and trainer.is_global_zero and not trainer.sanity_checking:
            self.draw(trainer, pl_module, batch, "val")

    @torch.no_grad()
    def draw(self, trainer: L.Trainer, system: L.LightningModule, batch: dict, tag: str) -> Path | None:
        """Write ``samples/controlnet-<tag>-step<N>.png``: one row per item, hint | generated | target."""
        if system.first_stage_model is None or not self.count:
            return None
        n = min(self.count, len(batch[system.control_key]))
        conditions = batch[system.cond_stage_model.key][:n]
        conditions = conditions.tolist() if torch.is_tensor(conditions) else list(conditions)
        hint = system.hint(batch, drop=False)[:n]  # (n, 3, H, W) in [0, 1]
        was_training = system.training
        system.eval()
        generated = Pipeline.from_system(system).generate_tensors(
            conditions, steps=self.steps, guidance=self.guidance, sampler=self.sampler, seed=SAMPLE_SEED,
            control=list(hint), height=hint.shape[-2], width=hint.shape[-1]).to(system.device)  # (n, 3, H, W)
        vae = system.first_stage_model
        target = batch["image"][:n] if "image" in batch else vae.decode(batch["mean"][:n].to(system.device))
        system.train(was_training)
        rows = torch.stack([hint * 2 - 1, generated, target.clamp(-1, 1)], dim=1).flatten(0, 1)  # (3n, 3, H, W)
        out = grid_path(trainer, f"controlnet-{tag}-step{trainer.global_step:07d}")
        save_image_atomic(image_grid([rows], ncol=3), out)
        write_text_atomic(out.with_suffix(".txt"), "hint | generated | target\n" + "\n".join(map(str, conditions)) + "\n")
        return out


class ReconstructionGrid(L.Callback):
    """A VAE's training inputs above their reconstructions (posterior mode) every ``every_n_steps`` steps."""

    def __init__(self, every_n_steps: int, count: int = 8):
        self.every_n_steps, self.count = every_n_steps, count

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Write ``samples/vae-step<N>.png`` when the step is due."""
        if not _due(trainer, self.every_n_steps):
            return
        inputs = pl_module.get_input(batch)[: self.count]
        recon, _ = pl_module(inputs, sample_posterior=False)
        save_image_atomic(image_grid([inputs, recon]), grid_path(trainer, f"vae-step{trainer.global_step}"))
