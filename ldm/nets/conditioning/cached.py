"""CachedTextEncoder: stands in for a frozen text encoder whose caption embeddings a latent cache already holds.

Stage 2 then trains on ``batch["context"]`` without building the encoder. The unconditional context (the empty
caption's) is kept once, for CFG dropout. The encoder's weights are not a module here: they are memory-mapped from
the cache's weights file and written into (and read back from) state dicts under their own names, so a checkpoint
holds ``cond_stage_model.*`` exactly as a run with the real encoder would, and sampling from the run loads as usual.
When a caller does ask to encode captions (a sample grid during training), the real encoder is built then, once.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ldm.io.module_weights import load_strict, params_on_meta
from ldm.nets.conditioning.base import Embedder


class FrozenWeights(Embedder):
    """What every stand-in for a frozen encoder shares: the encoder's weights in state dicts only (under their own
    names), and the real encoder built on first use (``encoder()``) when captions must be encoded.

    ``weights``: the frozen encoder's state dict (memory-mapped tensors); ``build_encoder``: makes the real encoder
    (``weights`` are loaded into it).
    """

    def __init__(self, weights: dict[str, torch.Tensor], build_encoder: Callable[[], nn.Module]):
        super().__init__()
        self.weights = weights
        self._build_encoder = build_encoder
        self._encoder: list[nn.Module] = []  # a list: the built encoder is no registered child
        self.register_state_dict_post_hook(_add_weights)
        self.register_load_state_dict_pre_hook(_take_weights)

    def null_condition(self, n: int) -> list[str]:
        """``n`` empty captions."""
        return [""] * n

    def encoder(self) -> nn.Module:
        """The real encoder with the cached weights, frozen, on this module's device (built once, without random
        init: its parameters are the cached tensors)."""
        if not self._encoder:
            with params_on_meta():
                encoder = self._build_encoder()
            load_strict(encoder, self.weights, "the cached text encoder's weights", assign=True)
            self._encoder.append(encoder.eval().requires_grad_(False))
        return self._encoder[0].to(self.device)


class CachedTextEncoder(FrozenWeights):
    """Context from the batch; ``unconditional(n)`` from the cached empty caption; weights in state dicts only.

    ``weights``: the frozen encoder's state dict (memory-mapped tensors); ``uncond``: its context for ``""``
    ``(1, T, D)``; ``build_encoder``: makes the real encoder (loaded with ``weights``) when captions must be encoded.
    """

    def __init__(self, weights: dict[str, torch.Tensor], uncond: torch.Tensor, build_encoder: Callable[[], nn.Module],
                 key: str = "caption"):
        super().__init__(weights, build_encoder)
        if uncond.ndim != 3 or uncond.shape[0] != 1:
            raise ValueError(f"uncond must be (1, T, D), got {tuple(uncond.shape)}")
        self.key, self.context_dim = key, uncond.shape[-1]
        self.register_buffer("uncond_context", uncond.float(), persistent=False)  # (1, T, D)

    def unconditional(self, n: int) -> torch.Tensor:
        """The cached unconditional context for ``n`` samples ``(n, T, D)``."""
        return self.uncond_context.expand(n, -1, -1)

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions → context ``(B, T, D)`` through the real encoder, built on first use (sampling only)."""
        with torch.no_grad():
            return self.encoder()(list(captions)).to(self.uncond_context.dtype)


def _add_weights(module: FrozenWeights, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: the frozen encoder's weights under their own names (as the real encoder would give them)."""
    for name, tensor in module.weights.items():
        state_dict[prefix + name] = tensor


def _take_weights(module: FrozenWeights, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                  missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Load hook: take the encoder's entries out of a state dict; their shapes must match the cached encoder's."""
    for name, tensor in module.weights.items():
        value = state_dict.pop(prefix + name, None)
        if value is None:
            missing_keys.append(prefix + name)
        elif value.shape != tensor.shape:
            error_msgs.append(f"{prefix + name}: shape {tuple(value.shape)} in the checkpoint, "
                              f"{tuple(tensor.shape)} in the cached text encoder")
