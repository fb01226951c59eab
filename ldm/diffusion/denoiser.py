"""The one interface to a network: ``Denoiser(network, schedule, parameterization)``, called as ``D(x, σ, **cond) → x0``.

VE form (Karras et al. 2022): x = x0 + σ·ε. The network sees the schedule's path point with the same noise
level, x_t = α·x = α·x0 + σ_t·ε with (α, σ_t) = ``schedule.alpha_sigma(σ)``, at time ``schedule.timestep(σ)``
(continuous, as k-diffusion's DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser; ``quantize=True`` rounds it),
and its output is read through the parameterisation. Samplers call ``D``; the training objective calls
``predict`` (the raw output and the path point it was made at) on the same noise levels.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ldm.diffusion.parameterization import Parameterization, get_parameterization
from ldm.diffusion.schedule import Schedule

DenoiserFn = Callable[..., Tensor]  # denoiser(x, sigma, **cond) -> x0, sigma of shape (B,)


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a (B,) tensor broadcasts against an ndim tensor."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def batch_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """σ as a (B,) floating tensor on x's device (a scalar is broadcast over the batch)."""
    sigma = torch.as_tensor(sigma, device=x.device)
    sigma = sigma if sigma.is_floating_point() else sigma.float()
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


class Prediction(NamedTuple):
    """A network output and the path point it was made at: x_t = alpha·x0 + sigma·ε (alpha, sigma (B, 1, 1, 1))."""

    output: Tensor
    x_t: Tensor
    alpha: Tensor
    sigma: Tensor


class Denoiser:
    """``network(x_t, t, **cond)`` seen as a VE denoiser ``D(x, σ, **cond) → x0`` (module docstring)."""

    def __init__(self, network: Callable[..., Tensor], schedule: Schedule,
                 parameterization: str | Parameterization, quantize: bool = False):
        self.network = network
        self.schedule = schedule
        self.parameterization = get_parameterization(parameterization)
        self.quantize = quantize

    def path_point(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x_t, α, σ_t) for VE x at noise levels ``sigma`` (B,); α and σ_t shaped (B, 1, 1, 1)."""
        alpha, sigma_t = (append_dims(v, x.ndim) for v in self.schedule.alpha_sigma(sigma))
        return x * alpha, alpha, sigma_t

    def predict(self, x: Tensor, sigma: Tensor | float, **cond) -> Prediction:
        """The network's raw output at VE x (B, C, H, W), noise levels ``sigma`` (B,) or a scalar."""
        sigma = batch_sigma(sigma, x)  # (B,)
        x_t, alpha, sigma_t = self.path_point(x, sigma)
        t = self.schedule.timestep(sigma)  # (B,)
        t = t.round().long() if self.quantize else t
        return Prediction(self.network(x_t, t.to(x.device), **cond), x_t, alpha, sigma_t)

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond) -> Tensor:
        """The x0 estimate at VE x and noise levels ``sigma``."""
        out, x_t, alpha, sigma_t = self.predict(x, sigma, **cond)
        return self.parameterization.to_x0(out, x_t, alpha, sigma_t)

    def output_for(self, x0: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        """The network output that would give ``x0`` at VE x and ``sigma`` (guidance rescaling works in it)."""
        x_t, alpha, sigma_t = self.path_point(x, batch_sigma(sigma, x))
        return self.parameterization.from_x0(x0, x_t, alpha, sigma_t)

    def x0_for(self, output: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        """The x0 a network output gives at VE x and ``sigma`` (inverse of ``output_for``)."""
        x_t, alpha, sigma_t = self.path_point(x, batch_sigma(sigma, x))
        return self.parameterization.to_x0(output, x_t, alpha, sigma_t)
