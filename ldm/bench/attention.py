"""Attention under bf16 autocast with gradients: this project's ``attention`` (fp32 compute on CPU) vs torch's
bf16 SDPA kernel, at the sequence lengths of the benchmark U-Net and of the shapes-text default.

PyTorch's CPU flash-attention backward in bf16 is slower than in fp32 at these sizes, so
``ldm.nets.unet.attention`` upcasts CPU training calls; this measurement is the evidence (and tells when a new
torch release makes the upcast unnecessary).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ldm.bench.report import Row
from ldm.bench.sizes import BenchSizes
from ldm.bench.steps import Options
from ldm.bench.timing import paired_medians
from ldm.nets.unet.attention import attention, merge_heads, split_heads

# configs/ldm/shapes-text.yaml: batch 64, 64-channel level at 8×8 latents, 32-channel heads, 16 caption tokens.
SHAPES_TEXT_SITES = (("shapes-text self", 64, 2, 64, 64, 32), ("shapes-text cross", 64, 2, 64, 16, 32))


def attention_sites(sizes: BenchSizes) -> list[tuple[str, int, int, int, int, int]]:
    """(name, batch, heads, queries, keys, head dim) of the benchmark U-Net's first level and of shapes-text."""
    heads = sizes.unet["num_heads"]
    n = sizes.latent_size**2
    dim = sizes.unet["model_channels"] // heads
    return [("bench U-Net self", sizes.batch, heads, n, n, dim),
            ("bench U-Net cross", sizes.batch, heads, n, sizes.tokens, dim), *SHAPES_TEXT_SITES]


def fwd_bwd(fn: Callable, batch: int, heads: int, n: int, m: int, dim: int, opts: Options) -> Callable[[], None]:
    """Forward + backward of ``fn(q, k, v)`` on bf16 tensors (B, N, H·D) under bf16 autocast."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, length, heads * dim, generator=g).to(opts.device, torch.bfloat16).requires_grad_()
               for length in (n, m, m))

    def step() -> None:
        with torch.autocast(opts.device.type, dtype=torch.bfloat16):
            out = fn(q, k, v)  # (B, N, H·D)
        out.float().square().mean().backward()

    return step


def torch_bf16(heads: int) -> Callable:
    """Plain SDPA on the bf16 inputs (what the code did before the upcast)."""
    def run(q, k, v):
        q, k, v = (split_heads(t, heads) for t in (q, k, v))  # (B, H, N, D)
        return merge_heads(F.scaled_dot_product_attention(q, k, v))  # (B, N, H·D)
    return run


def measure_attention(sizes: BenchSizes, opts: Options, precisions: Sequence[str]) -> list[Row]:
    """Calls/s of attention fwd+bwd with bf16 inputs: ``ldm.nets.unet.attention`` vs torch's bf16 kernel (bf16 only)."""
    rows: list[Row] = []
    if "bf16" not in precisions:
        return rows
    for name, batch, heads, n, m, dim in attention_sites(sizes):
        fns = {"ours": fwd_bwd(lambda q, k, v, h=heads: attention(q, k, v, h, "sdpa"), batch, heads, n, m, dim, opts),
               "theirs": fwd_bwd(torch_bf16(heads), batch, heads, n, m, dim, opts)}
        sec = paired_medians(fns, opts.device, opts.warmup, opts.repeats)
        rows.append(Row(f"attention fwd+bwd, {name} (B {batch}, {heads} heads, {n}×{m} tokens, d {dim}), "
                        "ldm vs torch's bf16 SDPA", 1 / sec["ours"], 1 / sec["theirs"], "calls/s", "bf16"))
    return rows
