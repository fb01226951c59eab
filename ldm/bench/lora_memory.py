"""GPU memory of one LoRA training step of an SDXL-sized model, counted on a CPU without weights (``ldm.bench.memory``).

The model is built from an inference config on the meta device (nothing allocated), LoRA adapters are added through
``ldm.nets.lora.LoRA``, every tensor becomes a fake one, and one step — text encoders (frozen, no gradient) or cached
embeddings, U-Net forward under bf16 autocast, MSE, backward, fused AdamW over the adapters — is counted op by op with
the dtypes CUDA's autocast gives and the flash attention kernel. The VAE is not on the device (cached latents).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ldm.bench.gpu_like import gpu_like
from ldm.bench.memory import (
    ACTIVATIONS,
    ADAPTERS,
    CUDA_BLOCK,
    GRADIENTS,
    OPTIMIZER,
    WEIGHTS,
    LiveBytes,
    MemoryPeak,
    fake_tensor_mode,
    step_peak,
    tag_module,
    to_fake,
)
from ldm.inference.sd import build_sd, read_model_config
from ldm.nets.conditioning.sdxl import SizeConditioning
from ldm.nets.lora import UNET_ATTENTION, LoRA

GIBI = 2**30
LATENT_FACTOR = 8  # pixels per latent cell (SD / SDXL VAE)
NUM_TIMESTEPS = 1000
LEARNING_RATE = 1e-4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CAPTION = "a photograph of an astronaut riding a horse"


@dataclass(frozen=True)
class Setup:
    """One configuration of the step: batch, gradient checkpointing, frozen weights' dtype, text encoders on the
    device (``gpu``) or cached embeddings (``cached``), LoRA rank, image side in pixels."""

    batch: int = 1
    checkpointing: bool = True
    base: str = "bf16"  # fp32: Lightning's bf16-mixed keeps weights fp32; bf16: frozen weights cast, adapters fp32
    text: str = "cached"
    rank: int = 16
    size: int = 1024

    def describe(self) -> str:
        """A table cell naming the configuration."""
        return (f"frozen {self.base}, text {'on GPU' if self.text == 'gpu' else 'cached'}, "
                f"checkpointing {'on' if self.checkpointing else 'off'}, batch {self.batch}")


def build(config: str | dict, setup: Setup) -> tuple[nn.Module, nn.Module | None, FakeTensorMode]:
    """(U-Net with LoRA adapters, the text conditioner or None, their fake mode), every tensor fake: nothing
    allocated."""
    node = read_model_config(config, overrides=[f"model.params.unet.params.use_checkpoint={setup.checkpointing}"])
    with torch.device("meta"):  # buffers too, and constructors never allocate a parameter before moving it
        system = build_sd({"model": node}, on_meta=True)
        unet = system.model.diffusion_model
        LoRA(rank=setup.rank, alpha=setup.rank, unet_targets=list(UNET_ATTENTION)).apply(unet, None)
    mode = fake_tensor_mode()
    frozen = DTYPES[setup.base]
    to_fake(unet, mode, torch.device("cpu"), frozen)
    text = to_fake(system.cond_stage_model, mode, torch.device("cpu"), frozen) if setup.text == "gpu" else None
    return unet, text, mode


def measure(config: str | dict, setup: Setup) -> MemoryPeak:
    """Peak bytes of a step of ``setup`` on the model of ``config`` (the second step: AdamW's state exists)."""
    unet, text, mode = build(config, setup)
    tracker = LiveBytes(CUDA_BLOCK)
    for module in (unet, text):
        if module is not None:
            tag_module(tracker, module)
    with mode, gpu_like():
        batch = _batch(unet, setup)
        for t in batch.values():
            tracker.tag(t, ACTIVATIONS)
        optimizer = adamw_with_state([p for p in unet.parameters() if p.requires_grad])

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                cond = _conditioning(text, setup) if text is not None else batch
                out = unet(batch["x"], batch["t"], cond["context"], cond["y"])  # (B, 4, h, w)
            F.mse_loss(out.float(), batch["target"]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step_peak(step, optimizer, tracker, steps=1)


def adamw_with_state(params: list[nn.Parameter]) -> torch.optim.AdamW:
    """Fused AdamW over ``params`` with its state made (a step on zero gradients), as in every step but a run's first."""
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, fused=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def _batch(unet: nn.Module, setup: Setup) -> dict[str, Tensor]:
    """Noisy latents, timesteps, target and (cached) context and ADM vector, as fake tensors."""
    b, side = setup.batch, setup.size // LATENT_FACTOR
    channels, context_dim = unet.in_channels, unet.context_dim
    return {"x": torch.randn(b, channels, side, side), "t": torch.randint(0, NUM_TIMESTEPS, (b,)),
            "target": torch.randn(b, unet.out_channels, side, side),
            "context": torch.randn(b, 77, context_dim), "y": torch.randn(b, unet.adm_in_channels)}


def _conditioning(text: nn.Module, setup: Setup) -> dict[str, Tensor]:
    """The frozen text encoders' context and ADM vector for a batch of captions (no gradient)."""
    with torch.no_grad():
        return text.conditioning([CAPTION] * setup.batch, SizeConditioning.for_size(setup.size, setup.size))


def memory_table(results: Sequence[tuple[Setup, MemoryPeak]]) -> str:
    """The peaks as a Markdown table in GiB, split into weights, adapters + AdamW state, gradients, activations."""
    header = ["configuration", "peak (GiB)", "frozen weights", "adapters + AdamW state", "gradients",
              "activations and temporaries"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setup, peak in results:
        k = peak.by_kind
        cells = [setup.describe(), f"**{peak.peak / GIBI:.2f}**", f"{k[WEIGHTS] / GIBI:.2f}",
                 f"{(k[ADAPTERS] + k[OPTIMIZER]) / GIBI:.2f}", f"{k[GRADIENTS] / GIBI:.2f}",
                 f"{k[ACTIVATIONS] / GIBI:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
