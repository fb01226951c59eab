"""What the network predicts — ε, v, x0 or a flow's velocity — as one small object each (cf. generative-models'
denoiser_scaling).

The ε / v / x0 formulas are in the VP form x_t = α·x0 + σ·ε with α = sqrt(ᾱ_t), σ = sqrt(1 − ᾱ_t), α² + σ² = 1
(the flow velocity's hold on any path);
``alpha`` and ``sigma`` are tensors broadcastable to x (e.g. (B, 1, 1, 1)). v = α·ε − σ·x0
(Salimans & Ho 2022, "Progressive Distillation", §4). Nothing outside this file branches on the name.

Min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", eq. 7–9):
the per-sample weight is min(SNR, γ) on the x0-space MSE. Since, for a fixed x_t,
‖ε − ε̂‖² = SNR·‖x0 − x̂0‖² and ‖v − v̂‖² = (SNR + 1)·‖x0 − x̂0‖², the weight on each
parameterisation's own MSE is min(SNR, γ) divided by that factor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor


class Parameterization(ABC):
    """The interface: a training target and the conversions of a model output to x0 and ε."""

    name: str

    @abstractmethod
    def target(self, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """What the model is trained to output for x_t = alpha·x0 + sigma·noise."""

    @abstractmethod
    def to_x0(self, model_out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """The x0 prediction implied by a model output at x_t."""

    @abstractmethod
    def to_eps(self, model_out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """The ε prediction implied by a model output at x_t."""

    @abstractmethod
    def from_x0(self, x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """The model output that would predict x0 at x_t (inverse of ``to_x0``)."""

    @abstractmethod
    def min_snr_weight(self, snr: Tensor, gamma: float) -> Tensor:
        """Min-SNR-γ weight on this parameterisation's MSE (module docstring)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EpsParameterization(Parameterization):
    """The model predicts the noise ε (DDPM, SD 1.x)."""

    name = "eps"

    def target(self, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return noise

    def to_x0(self, model_out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return (x_t - sigma * model_out) / alpha

    def to_eps(self, model_out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return model_out

    def from_x0(self, x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return (x_t - alpha * x0) / sigma

    def min_snr_weight(self, snr: Tensor, gamma: float) -> Tensor:
        return (gamma / snr).clamp(max=1.0)  # = min(SNR, γ)/SNR, and 1 at SNR = 0


class VParameterization(Parameterization):
    """The model predicts v = α·ε − σ·x0 (SD 2.x 768-v, zero-terminal-SNR models)."""

    name = "v"

    def target(self, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return alpha * noise - sigma * x0

    def to_x0(self, model_out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return alpha * x_t - sigma * model_out

    def to_eps(self, model_out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return sigma * x_t + alpha * model_out

    def from_x0(self, x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return (alpha * x_t - x0) / sigma

    def min_snr_weight(self, snr: Tensor, gamma: float) -> Tensor:
        return snr.clamp(max=gamma) / (snr + 1)


class X0Parameterization(Parameterization):
    """The model predicts the clean sample x0 directly."""

    name = "x0"

    def target(self, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return x0

    def to_x0(self, model_out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return model_out

    def to_eps(self, model_out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return (x_t - alpha * model_out) / sigma

    def from_x0(self, x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return x0

    def min_snr_weight(self, snr: Tensor, gamma: float) -> Tensor:
        return snr.clamp(max=gamma)


class FlowParameterization(Parameterization):
    """The model predicts the velocity v = ε − x0 of the straight path (rectified flow, flow matching, SD3).

    Written for any path x_t = α·x0 + σ·ε: x0 = (x_t − σ·v)/(α + σ); on the flow path α + σ = 1. For min-SNR,
    ‖v − v̂‖² = ((α + σ)/σ)²·‖x0 − x̂0‖², which on the flow path is (1 + √SNR)²·‖x0 − x̂0‖².
    """

    name = "flow"

    def target(self, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return noise - x0

    def to_x0(self, model_out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return (x_t - sigma * model_out) / (alpha + sigma)

    def to_eps(self, model_out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return model_out + self.to_x0(model_out, x_t, alpha, sigma)

    def from_x0(self, x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return (x_t - alpha * x0) / sigma - x0

    def min_snr_weight(self, snr: Tensor, gamma: float) -> Tensor:
        return snr.clamp(max=gamma) / (1 + snr.sqrt()) ** 2


PARAMETERIZATIONS: dict[str, Parameterization] = {
    p.name: p for p in (EpsParameterization(), VParameterization(), X0Parameterization(), FlowParameterization())
}


def get_parameterization(parameterization: str | Parameterization) -> Parameterization:
    """The parameterisation object for a name ("eps", "v", "x0"), or the object itself."""
    if isinstance(parameterization, Parameterization):
        return parameterization
    try:
        return PARAMETERIZATIONS[parameterization]
    except KeyError:
        raise ValueError(
            f"unknown parameterization {parameterization!r}; choose one of {', '.join(PARAMETERIZATIONS)}"
        ) from None
