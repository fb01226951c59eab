"""Colour fidelity of a reconstruction, and the bicubic baseline a VAE must beat.

``SaturatedError`` accumulates, over the pixels that are saturated in the *input* (HSV saturation ≥ 0.5 and value
≥ 0.25), the reconstruction's error per channel in 0-255 levels: the signed mean (a red drifting to orange shows as
a positive green bias) and the mean absolute error. ``bicubic_roundtrip`` is the baseline a VAE of downsampling
factor f is compared with: bicubic (antialiased) down by f, bicubic back up, keeping H/f · W/f · 3 numbers per
image against the latent's H/f · W/f · C.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SATURATION_MIN = 0.5  # HSV saturation (max − min) / max of a "saturated" pixel
VALUE_MIN = 0.25  # and its HSV value (max channel), so near-black noise does not count
LEVELS = 255.0
CHANNELS = "RGB"


def saturated_mask(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] → (B, H, W) bool: HSV saturation ≥ SATURATION_MIN and value ≥ VALUE_MIN."""
    unit = ((x.detach().float() + 1) / 2).clamp(0, 1)
    high, low = unit.amax(1), unit.amin(1)  # (B, H, W)
    return (high >= VALUE_MIN) & (high - low >= SATURATION_MIN * high)


class SaturatedError:
    """Running per-channel error of reconstructions on the inputs' saturated pixels, in 0-255 levels."""

    def __init__(self) -> None:
        self.signed = torch.zeros(3, dtype=torch.float64)
        self.absolute = torch.zeros(3, dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor, recon: torch.Tensor) -> None:
        """Add a batch: inputs and reconstructions (B, 3, H, W) in [-1, 1]."""
        mask = saturated_mask(x)  # (B, H, W)
        diff = (recon.detach().double().clamp(-1, 1) - x.detach().double()) * (LEVELS / 2)  # (B, 3, H, W)
        picked = diff.movedim(1, -1)[mask]  # (N, 3)
        self.signed += picked.sum(0).cpu()
        self.absolute += picked.abs().sum(0).cpu()
        self.count += picked.shape[0]

    def mean_absolute(self) -> float | None:
        """Mean absolute error over channels and saturated pixels (None when there were none)."""
        return (self.absolute.sum() / (3 * self.count)).item() if self.count else None

    def bias(self) -> str | None:
        """Signed mean error per channel, e.g. ``R -3.1 / G +4.2 / B +0.8`` (None without saturated pixels)."""
        if not self.count:
            return None
        return " / ".join(f"{c} {v:+.1f}" for c, v in zip(CHANNELS, (self.signed / self.count).tolist()))


def bicubic_resize(x: torch.Tensor, size: tuple[int, int] | torch.Size, antialias: bool) -> torch.Tensor:
    """(B, C, H, W) → (B, C, *size), bicubic in fp32 outside autocast (there is no bf16 kernel)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.interpolate(x.float(), size=tuple(size), mode="bicubic", antialias=antialias, align_corners=False)


def bicubic_roundtrip(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] → bicubic (antialiased) down by ``factor`` and back up, clamped to [-1, 1]."""
    height, width = x.shape[-2:]
    small = bicubic_resize(x, (height // factor, width // factor), antialias=True)
    return bicubic_resize(small, (height, width), antialias=False).clamp(-1, 1)
