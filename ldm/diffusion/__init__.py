"""Diffusion maths as plain functions and small objects: schedules, parameterisations, the denoiser, the
objective, guidance, samplers and the one sampling core."""

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.flow import FlowSchedule
from ldm.diffusion.guidance import cfg_denoiser
from ldm.diffusion.objective import DiffusionObjective
from ldm.diffusion.parameterization import PARAMETERIZATIONS, get_parameterization
from ldm.diffusion.sampling import DEFAULT_SPACING, SAMPLERS, sample, sample_latents
from ldm.diffusion.schedule import (
    Schedule,
    VPSchedule,
    make_betas,
    rescale_zero_terminal_snr,
)
from ldm.diffusion.spacing import get_timesteps

__all__ = [
    "DEFAULT_SPACING",
    "Denoiser",
    "DiffusionObjective",
    "FlowSchedule",
    "PARAMETERIZATIONS",
    "SAMPLERS",
    "Schedule",
    "VPSchedule",
    "cfg_denoiser",
    "get_parameterization",
    "get_timesteps",
    "make_betas",
    "rescale_zero_terminal_snr",
    "sample",
    "sample_latents",
]
