"""LPIPS (VGG) distance for evaluation, or a one-line reason when the VGG16 backbone weights are unavailable."""

from __future__ import annotations

import warnings

import torch

from ldm.core.metrics import check_pair
from ldm.nets.autoencoder.losses import VGG16_FILE, PerceptualWeightsUnavailable, build_lpips, vgg16_weights_path

_LPIPS: dict = {}  # "net" → the built network, or "reason" → why it could not be built (tried once)


def lpips_unavailable_reason() -> str | None:
    """One line saying why LPIPS cannot be computed (no VGG16 weights offline), or None if it can."""
    _lpips_net()
    return _LPIPS.get("reason")


def _lpips_net() -> torch.nn.Module | None:
    """The LPIPS network when torchvision's VGG16 weights are on disk; never a download (evaluation is offline)."""
    if "net" in _LPIPS or "reason" in _LPIPS:
        return _LPIPS.get("net")
    if not vgg16_weights_path().is_file():  # building lpips would try to download them first
        _LPIPS["reason"] = _offline_reason()
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation chatter about `pretrained`
            _LPIPS["net"] = build_lpips()
    except PerceptualWeightsUnavailable:  # a truncated or unreadable weights file
        _LPIPS["reason"] = _offline_reason()
        return None
    return _LPIPS["net"]


def _offline_reason() -> str:
    return (f"LPIPS n/a: torchvision's VGG16 weights are not on this machine; "
            f"place {VGG16_FILE} at {vgg16_weights_path()} to enable it")


@torch.no_grad()
def lpips_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """LPIPS (VGG) distance per image (B,) of two batches in [-1, 1]; None (see ``lpips_unavailable_reason``)
    when the VGG16 backbone weights cannot be had. The network is built once per process."""
    check_pair(x, y)
    net = _lpips_net()
    if net is None:
        return None
    net = net.to(x.device)
    return net(x.float(), y.float()).flatten().float()  # lpips takes [-1, 1] inputs; (B,)


# ------------------------------------------------------------------------------------------- edge F1
