"""Fréchet distance between two sets of feature vectors (Heusel et al. 2017, "GANs Trained by a Two
Time-Scale Update Rule Converge to a Local Nash Equilibrium", eq. 6):

    d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½)

Here the features come from the shapes classifier (``ldm.eval.classifier.features``), so the numbers
are comparable only between runs measured with the same classifier and sample count, never with
Inception-FID values from papers.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg

SQRTM_EPS = 1e-6  # diagonal offset added to both covariances when their product's square root is not finite
IMAG_TOLERANCE = 1e-3  # largest imaginary part (relative to the trace) accepted as round-off


def _as_array(feats: torch.Tensor | np.ndarray) -> np.ndarray:
    array = feats.detach().double().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"expected features (N, D) with N >= 2, got shape {array.shape}")
    return array


def feature_statistics(feats: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) (unbiased, N − 1) of features (N, D)."""
    array = _as_array(feats)
    return array.mean(axis=0), np.atleast_2d(np.cov(array, rowvar=False))


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2)."""
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product (fewer samples than dimensions): regularise
        offset = np.eye(sigma1.shape[0]) * SQRTM_EPS
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest = np.abs(covmean.imag).max()
        scale = max(abs(np.trace(covmean.real)), 1.0)
        if largest > IMAG_TOLERANCE * scale:
            warnings.warn(f"matrix square root has an imaginary part of {largest:.3g}; "
                          "the Fréchet distance is approximate (too few samples for the feature size?)", stacklevel=2)
        covmean = covmean.real
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(max(distance, 0.0))  # round-off can leave a tiny negative value for identical sets


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between two feature sets (N₁, D) and (N₂, D) modelled as Gaussians."""
    mu1, sigma1 = feature_statistics(feats_a)
    mu2, sigma2 = feature_statistics(feats_b)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature sizes differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    return frechet_distance_from_stats(mu1, sigma1, mu2, sigma2)
