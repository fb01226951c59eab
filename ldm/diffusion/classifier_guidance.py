"""Classifier guidance (Dhariwal & Nichol 2021, §4, Algorithm 1-2) through the denoiser interface.

A noise-aware classifier p(y | x_t) adds s·∇ log p(y | x) to the score. In VE form the score of the denoiser D is
(D(x; σ) − x)/σ² (Karras et al. 2022, eq. 3), so the guided denoiser is

    D_s(x; σ) = D(x; σ) + s·σ²·∇_x log p(y | x_t = α·x, t(σ))

which holds whatever the network predicts (ε, v, a flow velocity): it acts on the x0 estimate every sampler reads.
It composes with classifier-free guidance by wrapping the CFG denoiser (the guided and the classifier terms add).
The classifier's own schedule maps σ to its input, so it need not share the guided model's path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ldm.diffusion.denoiser import append_dims, batch_sigma
from ldm.diffusion.schedule import Schedule

Classifier = Callable[[Tensor, Tensor], Tensor]  # classifier(x_t, t) → logits (B, n_classes)


def class_log_prob_grad(classifier: Classifier, schedule: Schedule, x: Tensor, sigma: Tensor,
                        labels: Tensor) -> Tensor:
    """∇_x log p(labels | x) for VE x (B, C, H, W) at noise levels σ (B,): the classifier sees the path point."""
    with torch.enable_grad():
        x = x.detach().float().requires_grad_(True)
        alpha, _ = schedule.alpha_sigma(sigma)
        logits = classifier(x * append_dims(alpha, x.ndim), schedule.timestep(sigma))  # (B, K)
        chosen = logits.float().log_softmax(-1).gather(1, labels.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(chosen, x)
    return grad


def classifier_guided(denoiser: Callable[..., Tensor], classifier: Classifier, schedule: Schedule, labels: Tensor,
                      scale: float) -> Callable[..., Tensor]:
    """``denoiser`` steered toward ``labels`` (B,) by ``scale``·∇ log p(y | x) (module docstring); scale 0 is ``denoiser``."""

    def guided(x: Tensor, sigma: Tensor | float, **cond) -> Tensor:
        sigma = batch_sigma(sigma, x)  # (B,)
        x0 = denoiser(x, sigma, **cond)
        if not scale:
            return x0
        grad = class_log_prob_grad(classifier, schedule, x, sigma, labels.to(x.device))
        return x0 + scale * append_dims(sigma, x.ndim) ** 2 * grad.to(x0.dtype)

    return guided


@dataclass(frozen=True)
class ClassifierGuidance:
    """What ``sample_latents`` needs to steer a batch: the classifier and the schedule it was trained on (which turns
    a VE σ into its path point and time, so a classifier trained on one path can guide a model of another), each
    sample's target class, the scale."""

    classifier: Classifier
    schedule: Schedule
    labels: Tensor  # (B,)
    scale: float

    def wrap(self, denoiser: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """``classifier_guided`` around ``denoiser``."""
        return classifier_guided(denoiser, self.classifier, self.schedule, self.labels, self.scale)
