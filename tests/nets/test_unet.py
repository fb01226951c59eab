"""UNetModel at toy size: shapes across variants, backends, checkpointing, timesteps, control residuals, config."""

import math

import pytest
import torch

from ldm.core.config import ConfigError, instantiate_from_config
from ldm.nets.unet.attention import set_attention_backend
from ldm.nets.unet.blocks import timestep_embedding
from ldm.nets.unet.model import UNetModel

CONTEXT_DIM = 16
TINY = dict(
    image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
    attention_resolutions=[1, 2], channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
    context_dim=CONTEXT_DIM, legacy=False,
)


def randomize_zero_params(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give the zero-initialised parameters (out convs, proj_out, norms' biases) random values so outputs are not 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize_zero_params(UNetModel(**{**TINY, **overrides}), seed)


def inputs(batch=2, size=8, seed=1, channels=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.tensor([10.0, 700.0])[:batch]
    ctx = torch.randn(batch, 3, CONTEXT_DIM, generator=g)
    return x, t, ctx


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # conv proj_in/proj_out, num_heads
        {"use_linear_in_transformer": True, "num_heads": -1, "num_head_channels": 16},  # SD 2.x style
        {"transformer_depth": 2, "channel_mult": [1, 2, 2], "attention_resolutions": [2, 4], "out_channels": 8},
        {"num_res_blocks": [1, 2], "dropout": 0.1},
    ],
    ids=["conv-heads", "linear-head-channels", "depth2-3levels", "per-level-resblocks"],
)
def test_output_shape(overrides):
    model = make(**overrides)
    size = 16 if len(overrides.get("channel_mult", TINY["channel_mult"])) == 3 else 8
    x, t, ctx = inputs(size=size)
    out = model(x, t, ctx)
    assert out.shape == (2, overrides.get("out_channels", 4), size, size)
    assert torch.isfinite(out).all()


def test_class_conditional_unet_needs_labels_and_uses_them():
    model = make(num_classes=5).eval()
    x, t, ctx = inputs()
    assert model.label_emb.weight.shape == (5, 4 * TINY["model_channels"])
    out0 = model(x, t, ctx, y=torch.tensor([0, 0]))
    out1 = model(x, t, ctx, y=torch.tensor([3, 3]))
    assert out0.shape == (2, 4, 8, 8) and not torch.allclose(out0, out1)
    with pytest.raises(ValueError, match="if and only if the model is class-conditional"):
        model(x, t, ctx)
    with pytest.raises(ValueError, match="if and only if"):
        make()(x, t, ctx, y=torch.tensor([0, 1]))


def test_plain_unet_without_transformer_legacy_updown_scale_shift():
    """openaimodel's non-cross-attention variant (AttentionBlock), resblock up/down and FiLM norm."""
    model = make(
        use_spatial_transformer=False, context_dim=None, legacy=True, num_heads=-1, num_head_channels=16,
        resblock_updown=True, use_scale_shift_norm=True, num_classes=3,
    )
    keys = model.state_dict()
    assert "input_blocks.1.1.qkv.weight" in keys and "input_blocks.1.1.proj_out.weight" in keys
    assert "input_blocks.2.0.in_layers.2.weight" in keys and "input_blocks.2.0.op.weight" not in keys  # ResBlock down
    assert keys["input_blocks.1.0.emb_layers.1.weight"].shape == (2 * 32, 128)  # scale and shift
    x, t, _ = inputs()
    assert model(x, t, y=torch.tensor([0, 2])).shape == (2, 4, 8, 8)


def test_sdpa_and_math_backends_give_the_same_unet_output():
    model = make().eval()
    x, t, ctx = inputs()
    with torch.no_grad():
        sdpa = model(x, t, ctx)
        set_attention_backend(model, "math")
        math_out = model(x, t, ctx)
    assert sdpa.abs().mean() > 1e-3
    torch.testing.assert_close(sdpa, math_out, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = make()
    ckpt = UNetModel(**{**TINY, "use_checkpoint": True})
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = inputs()
    grads, calls = [], []
    for model in (plain, ckpt):
        count = [0]
        model.input_blocks[1][0].in_layers.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        model(x, t, ctx).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        calls.append(count[0])
    assert calls == [1, 2]  # the checkpointed block ran again during backward
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4, msg=name)


def test_fractional_and_scalar_timesteps():
    model = make().eval()
    x, _, ctx = inputs()
    with torch.no_grad():
        frac = model(x, torch.tensor([10.5, 10.5]), ctx)
        whole = model(x, torch.tensor([10, 10]), ctx)  # integer dtype works too
        scalar = model(x, 10.5, ctx)
    assert not torch.allclose(frac, whole)
    torch.testing.assert_close(scalar, frac)
    with pytest.raises(ValueError, match="timesteps must have shape"):
        model(x, torch.tensor([1.0, 2.0, 3.0]), ctx)


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 2.5, 999.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([math.exp(-math.log(10_000) * i / 4) for i in range(4)])
    torch.testing.assert_close(emb, torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1))
    assert timestep_embedding(t, 7).shape == (3, 7) and (timestep_embedding(t, 7)[:, -1] == 0).all()


def test_control_residuals_are_added_to_middle_and_skips():
    model = make().eval()
    x, t, ctx = inputs()
    with torch.no_grad():
        base = model(x, t, ctx)
        # the shapes of the residuals: each input block's output, then the middle block's
        shapes, h = [], x
        emb = model.time_embed(timestep_embedding(t, 32))
        for block in model.input_blocks:
            h = block(h, emb, ctx)
            shapes.append(h.shape)
        shapes.append(h.shape)
        assert model.num_control_residuals == len(shapes) == len(model.input_blocks) + 1
        zeros = [torch.zeros(s) for s in shapes]
        assert torch.equal(model(x, t, ctx, control=zeros), base)

        g = torch.Generator().manual_seed(3)
        skips_only = [torch.randn(s, generator=g) for s in shapes[:-1]] + [torch.zeros(shapes[-1])]
        kept = list(skips_only)
        assert not torch.allclose(model(x, t, ctx, control=skips_only), base)
        assert all(a is b for a, b in zip(skips_only, kept))  # the caller's list is left intact
        assert torch.equal(model(x, t, ctx, control=skips_only, only_mid_control=True), base)
        mid_only = zeros[:-1] + [torch.randn(shapes[-1], generator=g)]
        assert not torch.allclose(model(x, t, ctx, control=mid_only, only_mid_control=True), base)
        with pytest.raises(ValueError, match="control has 3 residuals"):
            model(x, t, ctx, control=zeros[:3])


def test_bfloat16_weights_take_float32_inputs():
    model = make().to(torch.bfloat16).eval()
    x, t, ctx = inputs()
    with torch.no_grad():
        out = model(x, t, ctx)
    assert out.dtype == torch.float32 and out.shape == x.shape


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"attention": "flash"}, "unknown attention backend"),
        ({"use_spatial_transformer": False}, "context_dim is set but use_spatial_transformer=False"),
        ({"context_dim": None}, "needs context_dim"),
        ({"model_channels": 16}, "not divisible by the 32 GroupNorm groups"),
        ({"num_heads": 3}, "not divisible by num_heads=3"),
        ({"num_heads": -1}, "either num_heads or num_head_channels"),
        ({"num_res_blocks": [1, 1, 1]}, "one entry per level"),
        ({"dims": 3}, "only 2-D"),
    ],
)
def test_bad_arguments_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        UNetModel(**{**TINY, **overrides})


def test_builds_from_a_config_node_and_rejects_bad_types():
    node = {"target": "ldm.nets.unet.model.UNetModel", "params": {**TINY, "attention": "sdpa"}}
    model = instantiate_from_config(node, "model.params.unet")
    assert isinstance(model, UNetModel) and model.config["channel_mult"] == [1, 2]
    bad = {"target": "ldm.nets.unet.model.UNetModel", "params": {**TINY, "channel_mult": "1,2"}}
    with pytest.raises(ConfigError, match="unet.params.channel_mult: expected Sequence"):  # caught by the type hints
        instantiate_from_config(bad, "model.params.unet")
    with pytest.raises(ConfigError, match="params.attention: expected"):
        instantiate_from_config({"target": "ldm.nets.unet.model.UNetModel", "params": {**TINY, "attention": "x"}})
    with pytest.raises(ConfigError, match="params.context_dim: expected int"):
        instantiate_from_config({"target": "ldm.nets.unet.model.UNetModel", "params": {**TINY, "context_dim": 16.5}})
