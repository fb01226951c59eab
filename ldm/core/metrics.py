"""Image quality measures as plain functions on tensors in [-1, 1] (B, 3, H, W), one value per image.

- ``psnr``: peak signal-to-noise ratio on images mapped to [0, 1] (data range 1), in dB;
- ``ssim``: Gaussian-window SSIM (Wang et al. 2004, "Image quality assessment: from error visibility to
  structural similarity", eq. 13: 11×11 window, σ = 1.5, K1 = 0.01, K2 = 0.03) on [0, 1], averaged over
  channels and over the valid (un-padded) positions — the same numbers as
  ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1)``;
- ``edge_f1``: F1 between two binary edge maps with a pixel tolerance, as ControlNet++ measures
  controllability (precision, recall and F1 together from ``edge_precision_recall_f1``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 1.0  # images are compared in [0, 1]
EDGE_TOLERANCE = 1  # pixels (chessboard distance), ControlNet++'s setting for Canny F1


def _unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1], float64 for numerically stable statistics."""
    return ((x.detach().double() + 1.0) / 2.0).clamp(0.0, 1.0)


def check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two (B, C, H, W) tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image (B,) of two (B, C, H, W) batches in [-1, 1]; +inf for identical images."""
    check_pair(x, y)
    mse = (_unit(x) - _unit(y)).pow(2).flatten(1).mean(1)  # (B,)
    return (10.0 * torch.log10(DATA_RANGE**2 / mse)).float()


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian (size,), float64."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of each channel, 'valid' positions only: (B, C, H, W) → (B, C, H-k+1, W-k+1)."""
    c = x.shape[1]
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)  # (B, C, H-k+1, W)
    return F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)  # (B, C, H-k+1, W-k+1)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Mean SSIM per image (B,) of two (B, C, H, W) batches in [-1, 1] (Gaussian window, on [0, 1])."""
    check_pair(x, y)
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}×{window} pixels, got {tuple(x.shape[-2:])}")
    x, y = _unit(x), _unit(y)
    g = gaussian_window(window, sigma).to(x.device)
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    mu_x, mu_y = _filter(x, g), _filter(y, g)
    var_x = _filter(x * x, g) - mu_x**2
    var_y = _filter(y * y, g) - mu_y**2
    cov = _filter(x * y, g) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float()  # (B,): mean over channels and positions


# ---------------------------------------------------------------------------------------------- LPIPS

def _edge_tensor(edges: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Binary map(s) (H, W) or (B, H, W) of any dtype (nonzero = edge) → float tensor (B, 1, H, W)."""
    t = torch.as_tensor(np.asarray(edges) if not isinstance(edges, torch.Tensor) else edges)
    if t.dim() not in (2, 3):
        raise ValueError(f"edge maps must be (H, W) or (B, H, W), got shape {tuple(t.shape)}")
    t = (t != 0).float()
    return (t if t.dim() == 3 else t[None])[:, None]  # (B, 1, H, W)


def _dilate(edges: torch.Tensor, tolerance: int) -> torch.Tensor:
    """Dilation by a (2t+1)² square: pixels within chessboard distance t of an edge pixel."""
    if tolerance == 0:
        return edges
    return F.max_pool2d(edges, kernel_size=2 * tolerance + 1, stride=1, padding=tolerance)


def edge_precision_recall_f1(
    hint_edges: torch.Tensor | np.ndarray, generated_edges: torch.Tensor | np.ndarray, tolerance: int = EDGE_TOLERANCE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tolerant precision, recall and F1 of generated vs hint edge maps, each (B,) (or 0-d for (H, W) inputs).

    precision = share of generated edge pixels within ``tolerance`` (chessboard distance) of a hint edge pixel;
    recall = share of hint edge pixels within ``tolerance`` of a generated edge pixel; F1 = their harmonic mean.
    Empty maps: a map with no generated edges has precision 1 (nothing wrong was drawn), a hint with no edges
    gives recall 1 (nothing was missed); so two empty maps score F1 = 1, and one empty map against a non-empty
    one scores F1 = 0 (precision or recall is 0).
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    hint, gen = _edge_tensor(hint_edges), _edge_tensor(generated_edges)
    if hint.shape != gen.shape:
        raise ValueError(f"edge maps differ in shape: {tuple(hint.shape)} vs {tuple(gen.shape)}")
    n_gen, n_hint = gen.sum((1, 2, 3)), hint.sum((1, 2, 3))  # (B,)
    gen_hits = (gen * _dilate(hint, tolerance)).sum((1, 2, 3))
    hint_hits = (hint * _dilate(gen, tolerance)).sum((1, 2, 3))
    precision = torch.where(n_gen > 0, gen_hits / n_gen.clamp(min=1), torch.ones_like(n_gen))
    recall = torch.where(n_hint > 0, hint_hits / n_hint.clamp(min=1), torch.ones_like(n_hint))
    total = precision + recall
    f1 = torch.where(total > 0, 2 * precision * recall / total.clamp(min=1e-12), torch.zeros_like(total))
    squeeze = _edge_dims(hint_edges) == 2
    return tuple(v[0] if squeeze else v for v in (precision, recall, f1))  # type: ignore[return-value]


def _edge_dims(edges: torch.Tensor | np.ndarray) -> int:
    return edges.dim() if isinstance(edges, torch.Tensor) else np.asarray(edges).ndim


def edge_f1(
    hint_edges: torch.Tensor | np.ndarray, generated_edges: torch.Tensor | np.ndarray, tolerance: int = EDGE_TOLERANCE
) -> torch.Tensor:
    """Tolerant edge F1 (see ``edge_precision_recall_f1``): 0-d for one (H, W) pair, (B,) for (B, H, W) maps."""
    return edge_precision_recall_f1(hint_edges, generated_edges, tolerance)[2]
