"""The architectures and batch sizes the benchmark measures: a small SD-like default and a toy ``--quick`` one."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ldm.nets.autoencoder.model import downsampling_factor

LATENT_CHANNELS = 4  # SD's latent channels
SD_SCALE_FACTOR = 0.18215  # SD's latent scale; only sets the magnitude of the benchmark's latents
SAMPLING_STEPS = 20
GUIDANCE_SCALE = 7.5  # SD's default CFG scale (any value ≠ 1 costs the same: one batched 2B forward)


@dataclass(frozen=True)
class BenchSizes:
    """U-Net arguments (``UNetModel(**unet)``), VAE ddconfig, batch, latent side and text tokens."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    batch: int
    latent_size: int
    tokens: int
    num_classes: int = 10
    matmul_size: int = 2048  # n of the n×n @ n×n matmul that measures the machine's peak FLOP/s

    @property
    def image_size(self) -> int:
        """Side in pixels of the images the VAE encodes (latent side × f)."""
        return self.latent_size * downsampling_factor(self.vae)

    @property
    def context_dim(self) -> int:
        """Width of the cross-attention context."""
        return self.unet["context_dim"]

    def with_options(self, batch: int | None = None, latent_size: int | None = None,
                     use_checkpoint: bool | None = None) -> BenchSizes:
        """A copy with the batch, latent side or gradient checkpointing changed (None: unchanged)."""
        sizes = replace(self, batch=batch or self.batch, latent_size=latent_size or self.latent_size)
        if use_checkpoint is not None:
            sizes = replace(sizes, unet={**sizes.unet, "use_checkpoint": use_checkpoint})
        return replace(sizes, unet={**sizes.unet, "image_size": sizes.latent_size},
                       vae={**sizes.vae, "resolution": sizes.image_size})


def _vae(ch: int, ch_mult: list[int], num_res_blocks: int) -> dict[str, Any]:
    return dict(double_z=True, z_channels=LATENT_CHANNELS, resolution=0, in_channels=3, out_ch=3, ch=ch,
                ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=[], dropout=0.0)


# SD v1's U-Net layout (conv proj_in, 4 levels, attention at 1/1, 1/2, 1/4) at 128 instead of 320 channels,
# 32×32 latents (256-px images), a 512-wide context of 77 tokens; the VAE is SD's own (configs/vae/kl-f8-256.yaml).
DEFAULT = BenchSizes(
    unet=dict(image_size=32, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, model_channels=128,
              num_res_blocks=2, attention_resolutions=[4, 2, 1], channel_mult=[1, 2, 4, 4], num_heads=4,
              use_spatial_transformer=True, transformer_depth=1, context_dim=512, legacy=False),
    vae=_vae(128, [1, 2, 4, 4], 2),
    batch=4, latent_size=32, tokens=77,
).with_options()

# Toy sizes for --quick (tests, smoke runs): seconds on a CPU. Attention in the middle block only: the transformer
# blocks are most of a U-Net's ops, and the compiled rows' compile time grows with the ops (216 here, 447 with
# attention at the first level too).
QUICK = BenchSizes(
    unet=dict(image_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, model_channels=32,
              num_res_blocks=1, attention_resolutions=[], channel_mult=[1, 2], num_heads=2,
              use_spatial_transformer=True, transformer_depth=1, context_dim=32, legacy=False),
    vae=_vae(32, [1, 1, 2, 2], 1),
    batch=2, latent_size=8, tokens=8, matmul_size=512,
).with_options()
