"""Stage 2: a thin LightningModule that trains the U-Net on cached latents (latent-diffusion's LatentDiffusion).

Attribute names follow the original so a full state dict reads ``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.*`` and ``model_ema.*``, as Stable Diffusion's do. The system is
built from modules: the VAE (``first_stage``) comes loaded, by ``ldm.inference.loaders`` (the driver and the
Pipeline call it); the objective (schedule, parameterisation, weighting) is one ``DiffusionObjective``.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import lightning as L
import torch
from torch import nn

from ldm.diffusion import DiffusionObjective
from ldm.io.checkpoints import EMA_PREFIX, EMA_SHADOWED, fit_report
from ldm.nets.compile import Compile
from ldm.nets.conditioning.base import ucg_dropout
from ldm.nets.ema import EMA, ema_scope
from ldm.nets.conditioning.cached import CachedTextEncoder
from ldm.nets.lora import LoRA, cast_frozen, is_lora_key, merge_adapters, text_towers
from ldm.systems.latents import adopt_cache_scale, cache_meta, cached_latents
from ldm.systems.optim import AdamW, total_steps
from ldm.systems.sharding import resharded, shard_system
from ldm.systems.sizes import batch_sizes, drop_outputs

VAL_NOISE_SEED = 1234  # validation loss uses the same noise levels and ε every time, so curves are comparable
SCALE_BUFFERS = ("scale_factor", "image_size")  # a LoRA checkpoint keeps them: a run samples at its own scale


class DiffusionWrapper(nn.Module):
    """Holds the U-Net as ``diffusion_model`` (the name SD checkpoints use) and calls it."""

    def __init__(self, diffusion_model: nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                c_concat: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """The network's output for path points ``x`` at times ``t``; ``c_concat`` (B, C', h, w) is joined to ``x``
        along the channels (LDM's "hybrid" conditioning: an inpainting U-Net's mask and masked-image latents)."""
        x = x if c_concat is None else torch.cat([x, c_concat.to(x)], dim=1)  # (B, C + C', h, w)
        return self.diffusion_model(x, t, context=context, **kwargs)


def require_module(value: object, name: str) -> nn.Module | None:
    """``value`` when it is a module (or None); a path here means the config was built without its loader."""
    if value is None or isinstance(value, nn.Module):
        return value
    raise TypeError(f"{name} is {value!r}, not a module: build systems whose config names a run with "
                    "ldm.inference.loaders.build_system (the training driver and the Pipeline do)")


class LatentDiffusion(L.LightningModule):
    """U-Net + conditioning + objective; the frozen VAE (``first_stage``) decodes samples.

    The optional parts are small objects it is given: ``ema`` (``ldm.nets.ema.EMA``: the decay of the weights' moving
    average, ``model_ema``; None keeps none), ``optimizer`` (``ldm.systems.optim.AdamW``), ``compile``
    (``ldm.nets.compile.Compile``: torch.compiles the trained networks in place when training starts, keys unchanged)
    and ``lora`` (below).
    ``base_ckpt`` + ``base_config`` record the public Stable Diffusion file a fine-tune starts from. With ``lora``
    (``ldm.nets.lora.LoRA``) only LoRA adapters train: ``add_lora`` adds them once the base weights are loaded (a
    loader, or Lightning's ``configure_model``), and checkpoints hold the adapters, their EMA and the scale buffers.
    """

    def __init__(
        self,
        unet: nn.Module,
        cond_stage: nn.Module,
        objective: DiffusionObjective,
        first_stage: nn.Module | None = None,
        ucg_rate: float = 0.1,
        cond_stage_trainable: bool = True,
        optimizer: AdamW | None = None,
        ema: EMA | None = EMA(),
        scale_factor: float | None = None,
        image_size: int | None = None,
        compile: Compile | None = None,
        base_ckpt: str | None = None,
        base_config: str | None = None,
        lora: LoRA | None = None,
    ):
        super().__init__()
        if lora is not None and cond_stage_trainable:
            raise ValueError("cond_stage_trainable: with lora only the adapters train; adapt the text encoder with "
                             "lora.params.text_targets (e.g. [attn.q_proj, attn.v_proj]) and set cond_stage_trainable: false")
        self.model = DiffusionWrapper(unet)
        self.cond_stage_model = cond_stage
        self.objective = objective
        first_stage = require_module(first_stage, "model.params.first_stage")
        self.first_stage_model = first_stage.eval().requires_grad_(False) if first_stage is not None else None
        self.cond_stage_model.requires_grad_(cond_stage_trainable)
        self.cond_stage_trainable = cond_stage_trainable
        self.ucg_rate = ucg_rate
        self.optimizer_settings = optimizer or AdamW()
        self.lora, self.lora_added, self.ema = lora, False, ema
        self.model_ema = ema.track(self.model) if ema is not None and lora is None else None  # LoRA: add_lora
        self.strict_loading = lora is None  # a LoRA run's checkpoints hold its adapters only (on_load_checkpoint)
        # Measured per cache (1 / std of the latents) unless given; stored so a checkpoint is self-contained.
        self.register_buffer("scale_factor", torch.tensor(scale_factor if scale_factor else math.nan))
        self.register_buffer("image_size", torch.tensor(image_size or 0))
        self.compile_settings = compile  # not `self.compile`: nn.Module.compile is a method
        # Where a fine-tune's starting weights come from (a public SD file and its inference config); loaders
        # (ldm.inference.sd_base) read it, the system never does.
        self.base_source = dict(base_ckpt=base_ckpt, base_config=base_config)

    @property
    def schedule(self):
        """The objective's noise schedule (what samplers walk)."""
        return self.objective.schedule

    @property
    def parameterization(self) -> str:
        """What the U-Net predicts: eps, v or x0."""
        return self.objective.parameterization.name

    # ------------------------------------------------------------------------------------ training

    def on_fit_start(self) -> None:
        """Take the scale factor and image size from the latent cache the data module reads."""
        adopt_cache_scale(self.scale_factor, self.image_size, cache_meta(self.trainer))
        if self.compile_settings is not None:
            for network in self.trained_networks():
                self.compile_settings.apply(network, self.device)

    def trained_networks(self) -> list[nn.Module]:
        """The networks a training step runs forward and backward (what ``compile`` compiles)."""
        return [self.model.diffusion_model]

    def latents(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents z·scale_factor: given (reflow pairs), sampled from the cached posterior, or encoded on the
        fly from images."""
        if "latent" in batch:
            return batch["latent"]  # already in the model's scaled latent space
        if "mean" in batch:
            return cached_latents(batch, self.scale_factor, generator)
        with torch.no_grad():
            z = self.first_stage_model.encode(batch["image"]).sample()
        return z * self.scale_factor

    def conditioning(self, batch: dict, drop: bool) -> dict:
        """The network's conditioning: cross-attention context (B, T, D), with CFG dropout when ``drop``; cached text
        embeddings come with the batch, and dropout swaps in the cached unconditional context. A conditioner that takes
        sizes (SDXL's) gets the batch's (``ldm.systems.sizes``) and returns ``{"context", "y"}``."""
        if getattr(self.cond_stage_model, "takes_sizes", False):
            return self.sized_conditioning(batch, drop)
        if isinstance(self.cond_stage_model, CachedTextEncoder):
            context = batch["context"]  # (B, T, D)
            null = self.cond_stage_model.unconditional(len(context))
            return {"context": ucg_dropout(context, null, self.ucg_rate) if drop and self.ucg_rate > 0 else context}
        cond = batch[self.cond_stage_model.key]
        if drop and self.ucg_rate > 0:
            cond = ucg_dropout(cond, self.cond_stage_model.null_condition(len(cond)), self.ucg_rate)
        return {"context": self.cond_stage_model(cond)}

    def sized_conditioning(self, batch: dict, drop: bool) -> dict:
        """A size-taking conditioner's outputs for the batch's captions and sizes; CFG dropout swaps a sample's outputs
        for the unconditional ones (zeroed text, the same sizes)."""
        encoder = self.cond_stage_model
        sizes = batch_sizes(batch, self.vae_factor())  # {field: (B, 2)} in pixels
        out = encoder.conditioning(batch[encoder.key], sizes)  # captions, or a cache's text outputs {name: (B, …)}
        if drop and self.ucg_rate > 0:
            n = len(sizes["target_size"])
            out = drop_outputs(out, encoder.unconditional_conditioning(n, sizes), self.ucg_rate)
        return out

    def vae_factor(self) -> int:
        """Pixels per latent cell (the VAE's downsampling factor), for the target size of a batch of latents."""
        factor = getattr(self.first_stage_model, "downsampling_factor", None)
        if factor is None:
            raise ValueError("size conditioning needs the VAE's downsampling factor: the system has no first_stage")
        return int(factor)

    def network(self) -> nn.Module:
        """The callable the objective trains: ``network(x_t, t, **conditioning)``."""
        return self.model

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Latents → conditioning (with CFG dropout) → objective → log."""
        loss = self.objective(self.network(), self.latents(batch), self.conditioning(batch, drop=True),
                              noise=batch.get("noise"))  # reflow pairs bring their noise
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        """Step, then update the EMA (before any checkpoint of this step is written)."""
        super().optimizer_step(*args, **kwargs)
        if self.model_ema is not None:
            self.model_ema(self.model)

    def ema_weights(self) -> AbstractContextManager:
        """Context manager: the EMA weights swapped in (when kept), the training weights back after."""
        return resharded(self, ema_scope(self.model, self.model_ema))  # sharded training: swap the shards

    def on_validation_epoch_start(self) -> None:
        """Validate with the EMA weights swapped in."""
        self._val_generator = torch.Generator(self.device).manual_seed(VAL_NOISE_SEED)
        self._ema_context = self.ema_weights()
        self._ema_context.__enter__()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The loss on held-out latents, with fixed noise."""
        g = self._val_generator
        z = self.latents(batch, generator=g)
        loss = self.objective(self.network(), z, self.conditioning(batch, drop=False), generator=g,
                              noise=batch.get("noise"))
        self.log("val/loss", loss, prog_bar=True, batch_size=len(z))

    def on_validation_epoch_end(self) -> None:
        """Swap the training weights back."""
        self._ema_context.__exit__(None, None, None)

    @torch.no_grad()
    def restart_ema(self) -> None:
        """Start every kept EMA from the current weights of the module it shadows (after a base's weights load)."""
        for ema_name, shadowed in EMA_SHADOWED.items():
            ema = getattr(self, ema_name, None)
            if ema is None:
                continue
            tracked, buffers = self.get_submodule(shadowed), dict(ema.named_buffers())
            for name, shadow in ema.m_name2s_name.items():
                buffers[shadow].copy_(tracked.get_parameter(name))
            ema.reset_num_updates()

    # ------------------------------------------------------------------------------------ LoRA

    def add_lora(self) -> None:
        """Add the configured LoRA adapters (after the base weights are loaded; once): only they keep gradients, and a
        kept EMA tracks them alone."""
        if self.lora is None or self.lora_added:
            return
        self.lora.apply(self.model.diffusion_model, text_towers(self.cond_stage_model))
        for name, param in self.named_parameters():
            param.requires_grad_(is_lora_key(name))
        if self.ema is not None:
            self.model_ema = self.ema.track(self.model)
        self.lora_added = True

    def merge_lora(self) -> None:
        """Fold the adapters into the base weights (for sampling): the networks are plain again, the EMA (of adapters)
        dropped; no more training as a LoRA system."""
        for network in (self.model.diffusion_model, self.cond_stage_model):
            merge_adapters(network)
        self.lora, self.model_ema = None, None

    def configure_model(self) -> None:
        """Lightning's hook before training starts or a checkpoint is restored: the LoRA adapters in place, and under
        Lightning's ModelParallelStrategy the networks sharded (``ldm.systems.sharding``). A LoRA run with
        ``base_dtype`` holds its frozen base weights in that dtype from here on (training only; loaders keep the
        file's)."""
        self.add_lora()
        if self.lora is not None and self.lora.base_dtype is not None:
            for network in (self.model.diffusion_model, self.cond_stage_model):
                cast_frozen(network, self.lora.torch_base_dtype)
        if self.device_mesh is not None:
            shard_system(self, self.device_mesh["data_parallel"])

    def in_checkpoint(self, key: str) -> bool:
        """Whether checkpoints hold the state entry ``key``: every one, or for LoRA the adapters, their EMA and the
        scale buffers (the base comes from its file)."""
        return self.lora is None or is_lora_key(key) or key.startswith(EMA_PREFIX) or key in SCALE_BUFFERS

    def checkpoint_state(self) -> dict:
        """The state entries a checkpoint of this system holds."""
        return {k: v for k, v in self.state_dict().items() if self.in_checkpoint(k)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """A LoRA run's checkpoint keeps the adapters only (megabytes, not the base's gigabytes)."""
        if self.lora is not None:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if self.in_checkpoint(k)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A LoRA checkpoint must hold exactly this system's adapter entries (Lightning then loads it non-strictly)."""
        if self.lora is not None:
            own = {k: v.shape for k, v in self.checkpoint_state().items()}
            fit_report(own, checkpoint["state_dict"], "the LoRA checkpoint",
                       hint="resume with the config (lora settings) the run was started with")

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates: the U-Net (and a trainable text encoder), or the LoRA adapters alone."""
        if self.lora is not None:
            return [p for p in self.parameters() if p.requires_grad]
        params = list(self.model.parameters())
        if self.cond_stage_trainable:
            params += [p for p in self.cond_stage_model.parameters() if p.requires_grad]
        return params

    def configure_optimizers(self) -> dict:
        """The configured optimiser over ``trainable_parameters``, its LR schedule stepped per batch."""
        return self.optimizer_settings.build(self.trainable_parameters(), total_steps(self.trainer))
