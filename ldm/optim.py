"""Optimiser helpers shared by the stages."""

from __future__ import annotations

from typing import Sequence

from torch import nn

FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")  # torch's fused Adam(W) kernels: ~3× faster steps than the per-tensor loop


def fused_supported(params: Sequence[nn.Parameter]) -> bool:
    """Whether torch's fused Adam(W) can step these parameters (floating point, on CPU or CUDA)."""
    return all(p.device.type in FUSED_OPTIMIZER_DEVICES and p.is_floating_point() for p in params)
