"""A CLIP text block's self-attention as four Linear layers, under ``nn.MultiheadAttention``'s state-dict keys.

open_clip's residual blocks hold an ``nn.MultiheadAttention`` whose q, k and v projections are one stacked
``in_proj_weight`` (3W, W) used inside a fused function: nothing a LoRA library can wrap. ``ClipSelfAttention`` computes
the same attention with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` Linear layers (the layout of Hugging Face's
CLIPAttention, which kohya's and diffusers' text-encoder LoRAs name), while its state dict still reads
``in_proj_weight`` / ``in_proj_bias`` / ``out_proj.*`` (hooks stack and split q, k, v), so SD checkpoints load and save
unchanged. Layers wrapped by peft (``q_proj.base_layer``) are handled too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.nets.lora import own_layer
from ldm.nets.unet.attention import merge_heads, split_heads

QKV = ("q", "k", "v")  # nn.MultiheadAttention stacks them in this order
STACKED = ("weight", "bias")  # in_proj_weight, in_proj_bias


def _own_keys(prefix: str, kind: str) -> tuple[str, str]:
    """The state-dict keys a projection's own ``kind`` (weight / bias) may have: plain or wrapped."""
    return f"{prefix}.{kind}", f"{prefix}.base_layer.{kind}"


class ClipSelfAttention(nn.Module):
    """Multi-head self-attention ``(B, L, W) → (B, L, W)`` with an additive mask, called as open_clip calls
    ``nn.MultiheadAttention`` (``attn(q, k, v, need_weights=False, attn_mask=mask)[0]``)."""

    def __init__(self, width: int, heads: int, batch_first: bool = True):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads, self.batch_first = heads, batch_first
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in QKV)
        self.out_proj = nn.Linear(width, width)
        self.register_state_dict_post_hook(_stack_qkv)
        self.register_load_state_dict_pre_hook(_split_qkv)

    @classmethod
    @torch.no_grad()
    def from_mha(cls, mha: nn.MultiheadAttention) -> ClipSelfAttention:
        """The same attention as ``mha`` (its weights copied; nothing is allocated for parameters on the meta device)."""
        out = cls(mha.embed_dim, mha.num_heads, mha.batch_first)
        for i, name in enumerate(QKV):
            rows = slice(i * mha.embed_dim, (i + 1) * mha.embed_dim)
            getattr(out, f"{name}_proj").weight.copy_(mha.in_proj_weight[rows])
            getattr(out, f"{name}_proj").bias.copy_(mha.in_proj_bias[rows])
        out.out_proj.load_state_dict(mha.out_proj.state_dict())
        return out

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                need_weights: bool = False, attn_mask: Tensor | None = None) -> tuple[Tensor, None]:
        """Self-attention of ``query`` (B, L, W) (or (L, B, W) when not batch-first); ``key`` / ``value`` are the
        same tensor (open_clip passes all three). Returns (output, None), as ``nn.MultiheadAttention``."""
        if need_weights:
            raise ValueError("ClipSelfAttention does not return attention weights")
        x = query if self.batch_first else query.transpose(0, 1)  # (B, L, W)
        q, k, v = (split_heads(proj(x), self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = self.out_proj(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)))  # (B, L, W)
        return (out if self.batch_first else out.transpose(0, 1)), None


def _stack_qkv(module: ClipSelfAttention, state: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: the q / k / v projections' own weights as ``in_proj_weight`` / ``in_proj_bias``."""
    for kind in STACKED:
        parts = []
        for name in QKV:
            layer = getattr(module, f"{name}_proj")
            for key in _own_keys(f"{prefix}{name}_proj", kind):
                state.pop(key, None)
            parts.append(getattr(own_layer(layer), kind).detach())
        state[f"{prefix}in_proj_{kind}"] = torch.cat(parts)  # (3W, W) / (3W,)


def _split_qkv(module: ClipSelfAttention, state: dict, prefix: str, local_metadata: dict, strict: bool,
               missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Load pre-hook: ``in_proj_weight`` / ``in_proj_bias`` split into the three projections (plain or wrapped)."""
    for kind in STACKED:
        stacked = state.pop(f"{prefix}in_proj_{kind}", None)
        if stacked is None:
            continue
        for name, part in zip(QKV, stacked.chunk(len(QKV))):
            wrapped = own_layer(getattr(module, f"{name}_proj")) is not getattr(module, f"{name}_proj")
            state[_own_keys(f"{prefix}{name}_proj", kind)[int(wrapped)]] = part.clone()  # own storage
