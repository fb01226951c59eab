"""Exponential moving average of a model's weights, as latent-diffusion's ``LitEma``.

The shadow weights are buffers named after the tracked parameters with the dots removed, so a Stable
Diffusion checkpoint's ``model_ema.*`` entries (``model_ema.diffusion_modelinput_blocks00weight``,
``model_ema.decay``, ``model_ema.num_updates``) load when the parent names this module ``model_ema`` and
tracks its ``model`` wrapper (the module holding ``diffusion_model``). Shadows are kept in fp32 whatever
the model's dtype or device. ``ema_scope`` swaps the EMA weights in and always restores the training ones.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from ldm.core.private_api import foreach_lerp_
from ldm.io.checkpoints import shadow_name

DEFAULT_DECAY = 0.9999  # latent-diffusion's
WARMUP_OFFSET = (1, 10)  # decay = min(decay, (1 + n) / (10 + n)) after n updates
SHADOW_DTYPE = torch.float32
FIXED_BUFFERS = ("decay", "num_updates")


def warmup_decay(decay: float, num_updates: int) -> float:
    """The decay used at the ``num_updates``-th update: ``min(decay, (1 + n) / (10 + n))``."""
    a, b = WARMUP_OFFSET
    return min(decay, (a + num_updates) / (b + num_updates))


@dataclass(frozen=True)
class EMA:
    """The exponential moving average a system keeps of what it trains (``ema: {target: ldm.nets.ema.EMA, params:
    {decay: 0.999}}``; ``ema: null`` keeps none): its decay, warmed up as ``warmup_decay`` says."""

    decay: float = DEFAULT_DECAY

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {self.decay}")

    def track(self, module: nn.Module) -> "LitEma":
        """A fresh shadow of ``module``'s trainable parameters."""
        return LitEma(module, decay=self.decay)


class LitEma(nn.Module):
    """EMA of ``model``'s trainable parameters; ``forward(model)`` / ``update(model)`` takes one step."""

    def __init__(self, model: nn.Module, decay: float = DEFAULT_DECAY, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be between 0 and 1, got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int))
        self.m_name2s_name: dict[str, str] = {}
        owners: dict[str, str] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            s_name = shadow_name(name)
            if s_name in owners or s_name in FIXED_BUFFERS:
                raise ValueError(f"EMA buffer name {s_name!r} is shared by {owners.get(s_name, s_name)!r} and {name!r}")
            owners[s_name] = name
            self.m_name2s_name[name] = s_name
            self.register_buffer(s_name, param.detach().to(SHADOW_DTYPE).clone())
        self.collected_params: list[torch.Tensor] = []

    def _apply(self, fn, recurse: bool = True):
        """Move with the parent module, but keep every floating buffer in fp32 (shadows never lose precision)."""
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new is not None and old.is_floating_point() and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def _shadows_for(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(model parameters, their shadow buffers), checking that the model still matches the EMA."""
        params, shadows = [], []
        for name, param in model.named_parameters():
            s_name = self.m_name2s_name.get(name)
            if s_name is None:
                if param.requires_grad:
                    raise KeyError(f"parameter {name!r} is trainable but was not tracked when the EMA was built")
                continue
            params.append(param)
            shadows.append(self._buffers[s_name])
        if len(params) != len(self.m_name2s_name):
            raise KeyError(f"the model has {len(params)} of the EMA's {len(self.m_name2s_name)} tracked parameters")
        return params, shadows

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA step: ``shadow ← decay·shadow + (1 − decay)·param`` (decay warmed up by ``num_updates``)."""
        decay = float(self.decay)
        if int(self.num_updates) >= 0:
            self.num_updates += 1
            decay = warmup_decay(decay, int(self.num_updates))
        params, shadows = self._shadows_for(model)
        same = [(p.detach(), s) for p, s in zip(params, shadows) if p.dtype == s.dtype and p.device == s.device]
        if same:  # one fused kernel per device for the common fp32 case
            foreach_lerp_([s for _, s in same], [p for p, _ in same], 1.0 - decay)
        for param, shadow in zip(params, shadows):  # others one by one: no full-model temporary copy
            if param.dtype != shadow.dtype or param.device != shadow.device:
                shadow.lerp_(param.detach().to(device=shadow.device, dtype=shadow.dtype), 1.0 - decay)

    update = forward

    def reset_num_updates(self) -> None:
        """Restart the decay warm-up."""
        self.num_updates.fill_(0)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into ``model``'s tracked parameters (cast to their dtype / device)."""
        for param, shadow in zip(*self._shadows_for(model)):
            param.copy_(shadow)

    @torch.no_grad()
    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Save copies of ``parameters`` to ``restore`` later."""
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put back the parameters saved by ``store`` (same order), then drop the copies."""
        parameters = list(parameters)
        if len(parameters) != len(self.collected_params):
            raise RuntimeError(f"restore: {len(parameters)} parameters but {len(self.collected_params)} were stored")
        for saved, param in zip(self.collected_params, parameters):
            param.copy_(saved)
        self.collected_params = []

    def scope(self, model: nn.Module) -> AbstractContextManager[nn.Module]:
        """Context manager: ``model`` holds the EMA weights inside, its own weights again after."""
        return ema_scope(model, self)


@contextmanager
def ema_scope(model: nn.Module, ema: LitEma | None, enabled: bool = True) -> Iterator[nn.Module]:
    """Swap ``ema``'s weights into ``model`` for the block; always restore the training weights (even on error)."""
    if ema is None or not enabled:
        yield model
        return
    params = _shadowed_params(model, ema)
    ema.store(params)
    ema.copy_to(model)
    try:
        yield model
    finally:
        ema.restore(params)


def _shadowed_params(model: nn.Module, ema: LitEma) -> list[torch.Tensor]:
    """The parameters of ``model`` that ``ema`` tracks (only those change inside a scope)."""
    return [p for name, p in model.named_parameters() if name in ema.m_name2s_name]
