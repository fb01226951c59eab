"""Every private torch API the project relies on, in one place. ``tests/core/test_private_api.py`` checks each against
the installed torch, so a release that changes one fails there first, not inside a training run.
(No private Lightning API is used: the CSV logger, the graceful stop and the checkpoint IO use its public ones.)
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, Sequence

import torch
import torch._inductor.config as inductor_config
from torch import Tensor, nn


def inductor_options(options: dict) -> AbstractContextManager:
    """TorchInductor's global config patched for a block (Dynamo reads some flags, e.g. ``freezing``, only there)."""
    return inductor_config.patch(options)


def compiled_call(module: nn.Module) -> Callable | None:
    """The compiled forward ``module.compile()`` installed (None before)."""
    return getattr(module, "_compiled_call_impl", None)


def set_compiled_call(module: nn.Module, call: Callable) -> None:
    """Replace the compiled forward ``module.compile()`` installed (keeps ``module.__call__``'s hooks)."""
    module._compiled_call_impl = call


def foreach_norm(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The 2-norm of each tensor, in one fused kernel per device and dtype."""
    return list(torch._foreach_norm(list(tensors)))


def foreach_lerp_(targets: Sequence[Tensor], ends: Sequence[Tensor], weight: float) -> None:
    """``target += weight·(end − target)`` for every pair, in place, in one fused kernel per device and dtype."""
    torch._foreach_lerp_(list(targets), list(ends), weight)
