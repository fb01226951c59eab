"""Diffusion maths as plain functions: schedules, parameterisations, loss, samplers, guidance."""

from ldm.diffusion.denoiser import make_denoiser
from ldm.diffusion.guidance import cfg_denoiser
from ldm.diffusion.loss import diffusion_loss, diffusion_loss_terms
from ldm.diffusion.parameterization import PARAMETERIZATIONS, get_parameterization
from ldm.diffusion.sampling import DEFAULT_SPACING, SAMPLERS, sample
from ldm.diffusion.schedule import NoiseSchedule, make_betas, rescale_zero_terminal_snr
from ldm.diffusion.spacing import get_sigmas, get_timesteps

__all__ = [
    "DEFAULT_SPACING",
    "NoiseSchedule",
    "PARAMETERIZATIONS",
    "SAMPLERS",
    "cfg_denoiser",
    "diffusion_loss",
    "diffusion_loss_terms",
    "get_parameterization",
    "get_sigmas",
    "get_timesteps",
    "make_betas",
    "make_denoiser",
    "rescale_zero_terminal_snr",
    "sample",
]
