"""Attention backends and the transformer blocks (SD names, shapes, zero-init, checkpointing)."""

import pytest
import torch

from ldm.nets.unet.attention import (
    XFORMERS_AVAILABLE,
    BasicTransformerBlock,
    CrossAttention,
    FeedForward,
    SpatialTransformer,
    attention,
    resolve_backend,
    set_attention_backend,
)

HEADS, DIM_HEAD = 4, 8
INNER = HEADS * DIM_HEAD


def _qkv(n=10, m=7, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n, INNER, generator=g)
    k = torch.randn(batch, m, INNER, generator=g)
    v = torch.randn(batch, m, INNER, generator=g)
    return q, k, v


def _explicit_attention(q, k, v, heads):
    """Per-head loop with softmax(QKᵀ/√d)V: an independent reference for the head layout (h d)."""
    d = q.shape[-1] // heads
    outs = []
    for i in range(heads):
        qi, ki, vi = (t[..., i * d : (i + 1) * d] for t in (q, k, v))
        w = torch.softmax(qi @ ki.transpose(1, 2) / d**0.5, dim=-1)
        outs.append(w @ vi)
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("backend", ["sdpa", "math", "auto"])
def test_backends_match_explicit_attention(backend):
    q, k, v = _qkv()
    out = attention(q, k, v, HEADS, backend)
    assert out.shape == q.shape
    torch.testing.assert_close(out, _explicit_attention(q, k, v, HEADS), atol=1e-5, rtol=1e-5)


def test_sdpa_and_math_agree_in_bfloat16():
    q, k, v = (t.bfloat16() for t in _qkv(n=33, m=12))
    sdpa, math = attention(q, k, v, HEADS, "sdpa"), attention(q, k, v, HEADS, "math")
    assert sdpa.dtype == math.dtype == torch.bfloat16
    torch.testing.assert_close(sdpa.float(), math.float(), atol=2e-2, rtol=2e-2)


def test_bf16_cpu_training_attention_runs_in_fp32_with_matching_gradients(monkeypatch):
    """Under bf16 autocast with gradients, CPU SDPA runs in fp32 (the bf16 flash backward is slow there)."""
    q32, k32, v32 = (t.requires_grad_() for t in _qkv(n=16, m=16))
    _explicit_attention(q32, k32, v32, HEADS).square().sum().backward()
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q32, k32, v32))
    sdpa, dtypes = torch.nn.functional.scaled_dot_product_attention, []

    def spy(q, k, v, *args, **kwargs):
        dtypes.append(q.dtype)
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(qb, kb, vb, HEADS, backend="sdpa")
    with torch.no_grad():
        attention(qb, kb, vb, HEADS, backend="sdpa")  # inference keeps the faster bf16 kernel
    assert dtypes == [torch.float32, torch.bfloat16]
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    for low, ref in ((qb, q32), (kb, k32), (vb, v32)):
        torch.testing.assert_close(low.grad.float(), ref.grad, atol=0.1, rtol=0.05)


def test_unknown_backend_is_a_clear_error():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention backend 'flash'.*sdpa"):
        attention(q, k, v, HEADS, "flash")
    with pytest.raises(ValueError, match="unknown attention backend"):
        CrossAttention(INNER, heads=HEADS, dim_head=DIM_HEAD, backend="fast")


@pytest.mark.skipif(XFORMERS_AVAILABLE, reason="xformers is installed: no fallback to test")
def test_missing_xformers_falls_back_to_sdpa_with_a_warning():
    with pytest.warns(UserWarning, match="xformers is not installed"):
        assert resolve_backend("xformers") == "sdpa"
    with pytest.warns(UserWarning):
        layer = CrossAttention(INNER, heads=HEADS, dim_head=DIM_HEAD, backend="xformers")
    assert layer.backend == "sdpa"


def test_cross_attention_names_shapes_and_context_check():
    layer = CrossAttention(INNER, context_dim=12, heads=HEADS, dim_head=DIM_HEAD)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {
        "to_q.weight": (INNER, INNER),
        "to_k.weight": (INNER, 12),
        "to_v.weight": (INNER, 12),
        "to_out.0.weight": (INNER, INNER),
        "to_out.0.bias": (INNER,),
    }
    x, ctx = torch.randn(2, 9, INNER), torch.randn(2, 5, 12)
    assert layer(x, ctx).shape == (2, 9, INNER)
    with pytest.raises(ValueError, match="context has 32 features but this layer expects 12"):
        layer(x)  # self-attention through a cross-attention layer of another width


def test_cross_attention_is_explicit_attention_of_projections():
    layer = CrossAttention(INNER, context_dim=12, heads=HEADS, dim_head=DIM_HEAD, backend="sdpa")
    x, ctx = torch.randn(2, 9, INNER), torch.randn(2, 5, 12)
    with torch.no_grad():
        ref = layer.to_out(_explicit_attention(layer.to_q(x), layer.to_k(ctx), layer.to_v(ctx), HEADS))
        torch.testing.assert_close(layer(x, ctx), ref, atol=1e-5, rtol=1e-5)


def test_geglu_feedforward_names():
    ff = FeedForward(INNER, glu=True)
    shapes = {k: tuple(v.shape) for k, v in ff.state_dict().items()}
    assert shapes == {
        "net.0.proj.weight": (2 * 4 * INNER, INNER),
        "net.0.proj.bias": (2 * 4 * INNER,),
        "net.2.weight": (INNER, 4 * INNER),
        "net.2.bias": (INNER,),
    }
    assert ff(torch.randn(3, INNER)).shape == (3, INNER)


def test_transformer_block_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = BasicTransformerBlock(INNER, HEADS, DIM_HEAD, context_dim=12, checkpoint=False)
    ckpt = BasicTransformerBlock(INNER, HEADS, DIM_HEAD, context_dim=12, checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, ctx = torch.randn(2, 9, INNER), torch.randn(2, 5, 12)
    grads = []
    for block in (plain, ckpt):
        xi = x.clone().requires_grad_(True)
        block(xi, ctx).square().sum().backward()
        grads.append([xi.grad] + [p.grad for p in block.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert {n.split(".")[0] for n, _ in plain.named_parameters()} == {"attn1", "attn2", "ff", "norm1", "norm2", "norm3"}


@pytest.mark.parametrize("use_linear", [False, True])
def test_spatial_transformer_is_identity_at_init_and_projections_match_sd(use_linear):
    st = SpatialTransformer(64, n_heads=2, d_head=32, context_dim=12, use_linear=use_linear)
    proj_shape = (64, 64) if use_linear else (64, 64, 1, 1)
    assert st.proj_in.weight.shape == st.proj_out.weight.shape == proj_shape
    assert "transformer_blocks.0.attn2.to_k.weight" in st.state_dict()
    x, ctx = torch.randn(2, 64, 4, 6), torch.randn(2, 5, 12)
    assert torch.equal(st(x, ctx), x)  # proj_out is zero-initialised
    torch.nn.init.normal_(st.proj_out.weight, std=0.1)
    out = st(x, ctx)
    assert out.shape == x.shape and not torch.allclose(out, x)


def test_set_attention_backend_switches_every_layer():
    st = SpatialTransformer(64, n_heads=2, d_head=32, context_dim=12, depth=2)
    set_attention_backend(st, "math")
    backends = {m.backend for m in st.modules() if isinstance(m, CrossAttention)}
    assert backends == {"math"}
    with pytest.raises(ValueError):
        set_attention_backend(st, "nope")
