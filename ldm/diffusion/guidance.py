"""Classifier-free guidance (Ho & Salimans 2022) around a VE denoiser, in one batched call.

D_cfg(x, σ) = D(x, σ | uncond) + s·(D(x, σ | cond) − D(x, σ | uncond)). Guidance is affine with
weights summing to 1, so it is the same in x0, ε or v space; rescaling is not, and follows diffusers'
``rescale_noise_cfg`` (Lin et al. 2023, §3.4, eq. 15–16) in the model's own prediction space (ε for
ε-models, v for v-models), which a ``Denoiser`` knows.

Conditioning contract (``cond`` / ``uncond`` are keyword dicts for ``denoiser(x, σ, **cond)``):

- Tensor values are batched along dim 0; a batch-1 tensor is broadcast to x's batch, so one prompt
  embedding serves a batch of samples. Lists / tuples are handled element-wise (e.g. control residuals).
  Other values (floats, strings, None) must be equal in both dicts and are passed once.
- When both dicts have the same keys, the model runs ONCE on batch 2B: ``[uncond; cond]`` (LDM's order).
- When the key sets differ (e.g. ControlNet guess mode: ``control`` only in ``cond``), the two branches
  cannot share a batch and run as two calls of batch B, each with its own dict.
- A negative prompt is just a different ``uncond``. ``scale == 1`` runs only the conditional branch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Denoiser, DenoiserFn, batch_sigma

STD_EPS = 1e-12  # guards the rescale division when a prediction is constant


def _broadcast(value: Any, batch: int) -> Any:
    """Expand batch-1 tensors (also inside lists / tuples) to ``batch``."""
    if isinstance(value, Tensor):
        return value.expand(batch, *value.shape[1:]) if value.ndim and value.shape[0] == 1 else value
    if isinstance(value, (list, tuple)):
        return type(value)(_broadcast(v, batch) for v in value)
    return value


def _concat(uncond: Any, cond: Any, key: str) -> Any:
    """Join one conditioning value of both branches along the batch: [uncond; cond]."""
    if isinstance(cond, Tensor) and isinstance(uncond, Tensor):
        if uncond.shape[1:] != cond.shape[1:]:
            raise ValueError(f"cond[{key!r}] {tuple(cond.shape)} and uncond {tuple(uncond.shape)} cannot be batched")
        return torch.cat([uncond, cond])
    if isinstance(cond, (list, tuple)) and isinstance(uncond, (list, tuple)) and len(cond) == len(uncond):
        return type(cond)(_concat(u, c, key) for u, c in zip(uncond, cond))
    if isinstance(cond, Tensor) or isinstance(uncond, Tensor) or cond != uncond:
        raise ValueError(f"cond[{key!r}] and uncond[{key!r}] differ and are not tensors; cannot batch them")
    return cond


def rescale_guidance(denoiser: Denoiser, x0_cfg: Tensor, x0_cond: Tensor, x: Tensor, sigma: Tensor,
                     rescale: float) -> Tensor:
    """Lin et al. 2023 eq. 15–16: match the guided prediction's std to the conditional one's, blend by ``rescale``."""
    pred_cfg, pred_cond = (denoiser.output_for(x0, x, sigma) for x0 in (x0_cfg, x0_cond))
    dims = list(range(1, x.ndim))
    std_cond, std_cfg = pred_cond.std(dim=dims, keepdim=True), pred_cfg.std(dim=dims, keepdim=True)
    rescaled = pred_cfg * (std_cond / std_cfg.clamp(min=STD_EPS))  # eq. 15
    pred = rescale * rescaled + (1 - rescale) * pred_cfg  # eq. 16
    return denoiser.x0_for(pred, x, sigma)


def cfg_denoiser(denoiser: DenoiserFn, cond: dict, uncond: dict, scale: float,
                 rescale: float = 0.0) -> Callable[[Tensor, Tensor], Tensor]:
    """A ``denoiser(x, sigma) → x0`` applying classifier-free guidance of ``scale`` (contract: module docstring).

    ``rescale`` > 0 needs a ``Denoiser`` (it rescales in the network's own prediction space).
    """
    if rescale and not isinstance(denoiser, Denoiser):
        raise TypeError("guidance rescale works in the model's prediction space: pass a Denoiser, not a function")

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        sigma, b = batch_sigma(sigma, x), x.shape[0]  # (B,)
        c = {k: _broadcast(v, b) for k, v in cond.items()}
        if scale == 1:
            return denoiser(x, sigma, **c)
        u = {k: _broadcast(v, b) for k, v in uncond.items()}
        if c.keys() == u.keys():
            joint = {k: _concat(u[k], c[k], k) for k in c}
            x0_uncond, x0_cond = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **joint).chunk(2)
        else:
            x0_uncond, x0_cond = denoiser(x, sigma, **u), denoiser(x, sigma, **c)
        x0 = x0_uncond + scale * (x0_cond - x0_uncond)
        return rescale_guidance(denoiser, x0, x0_cond, x, sigma, rescale) if rescale else x0

    return guided
