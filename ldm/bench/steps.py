"""What the benchmark runs: paired models on a device, U-Net training steps, precision and layout options."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.bench.sizes import BenchSizes
from ldm.bench.twins import diffusers_unet_like
from ldm.nets.compile import INDUCTOR
from ldm.nets.unet.model import UNetModel
from ldm.systems.optim import fused_supported

LEARNING_RATE = 1e-4
NUM_TRAIN_TIMESTEPS = 1000
ZERO_INIT_STD = 0.05  # random values for zero-initialised layers, so outputs (and their agreement) mean something
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Options:
    """How to run: device, warm-up calls and timed repeats, torch.compile (and its backend), channels-last."""

    device: torch.device
    warmup: int
    repeats: int
    compile: bool = False
    channels_last: bool = False
    backend: str = INDUCTOR  # what every compiled row compiles with


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for "bf16", nothing for "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def place(module: nn.Module, opts: Options) -> nn.Module:
    """Move a module to the device (channels-last when asked)."""
    module = module.to(opts.device)
    return module.to(memory_format=torch.channels_last) if opts.channels_last else module


def place_input(x: Tensor, opts: Options) -> Tensor:
    """Move an input to the device; 4-D image-like tensors go channels-last when asked."""
    x = x.to(opts.device)
    return x.contiguous(memory_format=torch.channels_last) if opts.channels_last and x.ndim == 4 else x


def maybe_compile(fn: Callable, opts: Options) -> Callable:
    """torch.compile a module or function when asked (both sides of a comparison get the same treatment)."""
    return torch.compile(fn, backend=opts.backend) if opts.compile else fn


@torch.no_grad()
def fill_zero_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give zero-initialised parameters small random values (in place) so the network's output is not 0."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if not p.any():
            p.copy_(torch.randn(p.shape, generator=g) * ZERO_INIT_STD)
    return model


class DiffusersUNetCall(nn.Module):
    """diffusers' U-Net behind our call signature ``model(x, t, context) → tensor``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        """x (B, C, H, W), timesteps (B,), context (B, T, D) → (B, C_out, H, W)."""
        return self.unet(x, timesteps, encoder_hidden_states=context, return_dict=False)[0]


def unet_pair(sizes: BenchSizes, opts: Options, seed: int = 0) -> tuple[UNetModel, DiffusersUNetCall]:
    """Our UNetModel and diffusers' twin with the same weights, on the device (not compiled)."""
    torch.manual_seed(seed)
    ours = fill_zero_init(UNetModel(**sizes.unet), seed)
    theirs = DiffusersUNetCall(diffusers_unet_like(ours, sizes.unet))
    return place(ours, opts), place(theirs, opts)


def unet_inputs(sizes: BenchSizes, opts: Options, batch: int | None = None, seed: int = 1) -> dict[str, Tensor]:
    """A batch of noisy latents, integer timesteps, context and regression target for the U-Net."""
    g = torch.Generator().manual_seed(seed)
    b, s, c = batch or sizes.batch, sizes.latent_size, sizes.unet["in_channels"]
    x = torch.randn(b, c, s, s, generator=g)
    return {
        "x": place_input(x, opts),
        "t": torch.randint(0, NUM_TRAIN_TIMESTEPS, (b,), generator=g).to(opts.device),
        "context": torch.randn(b, sizes.tokens, sizes.context_dim, generator=g).to(opts.device),
        "target": place_input(torch.randn(b, sizes.unet["out_channels"], s, s, generator=g), opts),
    }


def train_step(model: nn.Module, inputs: dict[str, Tensor], opts: Options, precision: str,
               keep_grads: bool = False, fused: bool = False) -> Callable[[], None]:
    """One training step of ``model(x, t, context)``: forward (autocast per precision), MSE, backward, AdamW.

    ``fused``: torch's fused AdamW kernel, as this project's systems use it (``ldm.systems.optim``); diffusers' training
    scripts use the default.

    ``keep_grads`` zeroes the gradients in place instead of freeing them, so that after a first step the
    memory a step allocates is activations and workspace only (weights, grads, AdamW state already exist).
    """
    return train_step_and_optimizer(model, inputs, opts, precision, keep_grads, fused)[0]


def train_step_and_optimizer(model: nn.Module, inputs: dict[str, Tensor], opts: Options, precision: str,
                             keep_grads: bool = False, fused: bool = False
                             ) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """``train_step`` and the AdamW it steps, over the parameters that train (all, or a LoRA's adapters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, fused=fused and fused_supported(params))
    x, t, ctx, target = inputs["x"], inputs["t"], inputs["context"], inputs["target"]

    def step() -> None:
        opt.zero_grad(set_to_none=not keep_grads)
        with autocast(opts.device, precision):
            out = model(x, t, ctx)  # (B, C, H, W)
        F.mse_loss(out.float(), target).backward()
        opt.step()

    return step, opt


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's warning about ``self.log`` outside a Trainer (the benchmark calls steps directly)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        yield
