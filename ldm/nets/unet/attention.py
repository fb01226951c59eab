"""Cross-attention transformer blocks with Stable Diffusion's module names, and one attention function.

Module and parameter names follow latent-diffusion / stablediffusion's ``ldm/modules/attention.py``
(``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``ff.net.0.proj``, ``ff.net.2``, ``norm1..3``, ``proj_in``,
``proj_out``, ``transformer_blocks``) so SD U-Net weights load unchanged.

The attention product itself is one function, :func:`attention`, with swappable backends:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU);
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (only when xformers is installed; CUDA only);
- ``math``: explicit ``softmax(QKᵀ/√d)·V`` computed in fp32 with autocast off, like the original's
  ``_ATTN_PRECISION = "fp32"`` upcast — slow, the numerical reference;
- ``auto``: ``xformers`` for CUDA tensors when installed, else ``sdpa`` (decided per call).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

try:  # optional dependency: `pip install .[xformers]`
    import xformers.ops as xops

    XFORMERS_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    xops = None
    XFORMERS_AVAILABLE = False

AttentionBackend = Literal["auto", "sdpa", "xformers", "math"]
ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "sdpa", "xformers", "math")

FF_MULT = 4  # FeedForward hidden width = FF_MULT × dim (SD: 320 → 1280)
REDUCED_PRECISION = (torch.bfloat16, torch.float16)
UPCAST_MAX_SCORES = 512 * 512  # CPU bf16 training: fp32 attention up to this many query × key scores per head
SPATIAL_NORM_GROUPS = 32
SPATIAL_NORM_EPS = 1e-6  # SpatialTransformer's GroupNorm eps in SD (ResBlocks use torch's 1e-5)


def resolve_backend(name: str) -> str:
    """Validate a backend name; ``xformers`` without xformers installed falls back to ``sdpa`` with a warning."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "xformers" and not XFORMERS_AVAILABLE:
        warnings.warn(
            "attention='xformers' was asked for but xformers is not installed (pip install .[xformers]); "
            "using PyTorch's scaled_dot_product_attention ('sdpa') instead.",
            stacklevel=2,
        )
        return "sdpa"
    return name


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, backend: str = "sdpa") -> Tensor:
    """Multi-head attention: q (B, N, H·D), k and v (B, M, H·D) → (B, N, H·D); scale 1/√D, no mask."""
    if backend == "auto" or (backend == "xformers" and not q.is_cuda):
        backend = "xformers" if (XFORMERS_AVAILABLE and q.is_cuda) else "sdpa"
    if backend == "sdpa":
        q, k, v = (split_heads(t, heads) for t in (q, k, v))  # views, no copies
        if _cpu_reduced_precision_training(q, k):
            with torch.autocast("cpu", enabled=False):  # autocast would cast fp32 inputs back to bf16
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D)
        return merge_heads(out)
    if backend == "xformers":
        if xops is None:
            raise RuntimeError("attention backend 'xformers' needs xformers installed (pip install .[xformers])")
        q, k, v = (rearrange(t, "b n (h d) -> b n h d", h=heads) for t in (q, k, v))  # xformers' BMHK layout
        out = xops.memory_efficient_attention(q, k, v)  # (B, N, H, D)
        return rearrange(out, "b n h d -> b n (h d)")
    if backend == "math":
        return _math_attention(q, k, v, heads)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")


def split_heads(t: Tensor, heads: int) -> Tensor:
    """(B, N, H·D) → (B, H, N, D), a view (einops' "b n (h d) -> b h n d", in plain torch: quicker to compile)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """(B, H, N, D) → (B, N, H·D) (einops' "b h n d -> b n (h d)")."""
    return t.transpose(1, 2).flatten(2)


def _cpu_reduced_precision_training(q: Tensor, k: Tensor) -> bool:
    """True for bf16/fp16 CPU attention over at most UPCAST_MAX_SCORES scores that will be backpropagated.

    PyTorch's CPU flash-attention backward in bf16 has a large fixed cost per head: at U-Net sequence lengths
    it is 1.1-4.6× slower than computing in fp32 (as the original's ``_ATTN_PRECISION = "fp32"`` does), and
    only above ~512² scores per head does bf16 win (``python scripts/bench.py --only attention``).
    Inference keeps the faster bf16 forward kernel.
    """
    return (q.device.type == "cpu" and q.dtype in REDUCED_PRECISION and torch.is_grad_enabled() and q.requires_grad
            and q.shape[-2] * k.shape[-2] <= UPCAST_MAX_SCORES)


def _math_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """The reference product softmax(QKᵀ/√D)·V, all in fp32 and outside autocast."""
    dtype = q.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v = (split_heads(t.float(), heads) for t in (q, k, v))
        scale = q.shape[-1] ** -0.5
        weights = torch.einsum("bhid,bhjd->bhij", q, k).mul_(scale).softmax(dim=-1)  # (B, H, N, M)
        out = torch.einsum("bhij,bhjd->bhid", weights, v)  # (B, H, N, D)
    return merge_heads(out).to(dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of a module in place and return it (works on the meta device too)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def maybe_checkpoint(fn, *args, enabled: bool):
    """Run ``fn(*args)``, under non-reentrant gradient checkpointing when enabled and gradients are on."""
    if enabled and torch.is_grad_enabled():
        return torch_checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class CrossAttention(nn.Module):
    """Multi-head attention of x (queries) over context (keys/values); self-attention when context is None."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        backend: AttentionBackend = "auto",
    ):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.context_dim = context_dim
        self.backend = resolve_backend(backend)
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x (B, N, query_dim), context (B, M, context_dim) or None → (B, N, query_dim)."""
        context = x if context is None else context
        if context.shape[-1] != self.context_dim:
            raise ValueError(
                f"attention context has {context.shape[-1]} features but this layer expects {self.context_dim} "
                "(check context_dim, and pass `context` to a cross-attention U-Net)"
            )
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.backend)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): x·W → (a, g), a · gelu(g)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        """(…, dim_in) → (…, dim_out)."""
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP: net.0 (GEGLU or Linear+GELU), net.1 Dropout, net.2 Linear."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = FF_MULT, glu: bool = False, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        """(…, dim) → (…, dim_out)."""
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention (attn1), cross-attention (attn2), gated feed-forward (ff)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        checkpoint: bool = True,
        disable_self_attn: bool = False,
        backend: AttentionBackend = "auto",
    ):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        # attn1 attends over the context too when self-attention is disabled (as in SD 2.x's option).
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout, backend)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout, backend)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x (B, N, dim), context (B, M, context_dim) → (B, N, dim)."""
        return maybe_checkpoint(self._forward, x, context, enabled=self.checkpoint)

    def _forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        x = self.attn1(self.norm1(x), context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: norm → proj_in → blocks → proj_out (zero-init) → + input.

    ``use_linear`` selects SD 2.x's Linear projections (applied after flattening) instead of SD 1.x's 1×1 convs.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = True,
        backend: AttentionBackend = "auto",
    ):
        super().__init__()
        inner_dim = n_heads * d_head
        self.in_channels = in_channels
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(SPATIAL_NORM_GROUPS, in_channels, eps=SPATIAL_NORM_EPS)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim,
                disable_self_attn=disable_self_attn, checkpoint=use_checkpoint, backend=backend,
            )
            for _ in range(depth)
        )
        if use_linear:
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), context (B, M, context_dim) or None (self-attention) → (B, C, H, W)."""
        _, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)  # (B, inner, H, W)
        x = x.flatten(2).transpose(1, 2).contiguous()  # (B, C, H, W) → (B, HW, C): one copy, then dense matmuls
        if self.use_linear:
            x = self.proj_in(x)  # (B, HW, inner)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)  # (B, HW, C)
        x = x.transpose(1, 2).unflatten(2, (h, w)).contiguous()  # (B, C, H, W), back to NCHW memory layout
        if not self.use_linear:
            x = self.proj_out(x)  # (B, C, H, W)
        return x + x_in


def set_attention_backend(model: nn.Module, backend: AttentionBackend) -> nn.Module:
    """Switch every attention layer in ``model`` to ``backend`` (e.g. to compare sdpa and math); returns model."""
    resolved = resolve_backend(backend)
    for module in model.modules():
        if isinstance(getattr(module, "backend", None), str):  # CrossAttention and blocks.AttentionBlock
            module.backend = resolved
    return model
