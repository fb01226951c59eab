"""The exact Gaussian data of ``ldm.eval.gaussian`` for the diffusion tests, and a VE function used as a Denoiser."""

from __future__ import annotations

from torch import Tensor

from ldm.diffusion.denoiser import Denoiser, batch_sigma
from ldm.eval.gaussian import CHANNELS, MEAN, STD, channel_stats, ideal_model_fn, ideal_x0, sample_data

__all__ = ["CHANNELS", "MEAN", "STD", "FunctionDenoiser", "channel_stats", "ideal_model_fn", "ideal_x0", "sample_data"]


class FunctionDenoiser(Denoiser):
    """A VE function ``fn(x, σ, **cond) → x0`` used as a Denoiser of a schedule and parameterisation (what guidance
    rescaling needs to know), its x0 returned exactly."""

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond) -> Tensor:
        return self.network(x, batch_sigma(sigma, x), **cond)
