"""ControlNet at toy size: residuals, zero-init no-op, hint block per VAE factor, weight copy, scales."""

import pytest
import torch

from ldm.core.config import instantiate_from_config
from ldm.nets.controlnet import (
    ControlNet,
    apply_control_scales,
    copy_unet_weights,
    guess_mode_scales,
    make_hint_block,
)
from ldm.nets.unet.model import UNetModel

CONTEXT_DIM = 16
TINY = dict(
    image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
    attention_resolutions=[2], channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
    context_dim=CONTEXT_DIM, legacy=False,
)
LATENT = 8


def randomize_zero_params(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give the zero-initialised parameters random values so outputs are not trivially 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def unet_and_inputs(factor=4, seed=0, **overrides):
    torch.manual_seed(seed)
    unet = randomize_zero_params(UNetModel(**{**TINY, **overrides}), seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, 4, LATENT, LATENT, generator=g)
    hint = torch.rand(2, 3, LATENT * factor, LATENT * factor, generator=g)
    ctx = torch.randn(2, 3, CONTEXT_DIM, generator=g)
    return unet, x, torch.tensor([3.0, 500.5]), ctx, hint


def test_residuals_match_the_unet_skips():
    unet, x, t, ctx, hint = unet_and_inputs()
    cn = ControlNet.from_unet(unet, hint_channels=3, downsampling_factor=4)
    with torch.no_grad():
        residuals = cn(x, hint, t, ctx)
        h, shapes = x, []
        emb = unet.time_embed(torch.zeros(2, 32))
        for block in unet.input_blocks:
            h = block(h, emb, ctx)
            shapes.append(h.shape)
        shapes.append(unet.middle_block(h, emb, ctx).shape)
    assert len(residuals) == len(cn.input_blocks) + 1 == unet.num_control_residuals == len(cn.zero_convs) + 1
    assert [r.shape for r in residuals] == shapes


def test_zero_initialised_controlnet_leaves_the_unet_output_unchanged():
    unet, x, t, ctx, hint = unet_and_inputs()
    cn = ControlNet.from_unet(unet, downsampling_factor=4).eval()
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx, control=cn(x, hint, t, ctx)), unet(x, t, ctx))


def test_trained_controlnet_steers_the_unet_through_the_hint():
    unet, x, t, ctx, hint = unet_and_inputs()
    cn = randomize_zero_params(ControlNet.from_unet(unet, downsampling_factor=4), seed=5).eval()
    with torch.no_grad():
        base = unet(x, t, ctx)
        controlled = unet(x, t, ctx, control=cn(x, hint, t, ctx))
        other_hint = unet(x, t, ctx, control=cn(x, torch.zeros_like(hint), t, ctx))
    assert not torch.allclose(controlled, base)
    assert not torch.allclose(controlled, other_hint)


@pytest.mark.parametrize("factor, n_strided", [(1, 0), (2, 1), (4, 2), (8, 3)])
def test_hint_block_brings_the_hint_to_latent_resolution(factor, n_strided):
    block = make_hint_block(3, 32, factor)
    assert [k for k in block.state_dict() if k.endswith("weight")] == [f"{i}.weight" for i in range(0, 16, 2)]
    assert sum(m.stride == (2, 2) for m in block if isinstance(m, torch.nn.Conv2d)) == n_strided
    assert block(torch.rand(1, 3, LATENT * factor, LATENT * factor)).shape == (1, 32, LATENT, LATENT)
    assert not block[14].weight.any() and not block[14].bias.any()  # zero conv into the U-Net


@pytest.mark.parametrize("factor", [0, 3, 16])
def test_unsupported_downsampling_factor_is_a_clear_error(factor):
    with pytest.raises(ValueError, match="downsampling_factor must be 1, 2, 4 or 8"):
        make_hint_block(3, 32, factor)


def test_hint_of_the_wrong_size_is_a_clear_error():
    unet, x, t, ctx, hint = unet_and_inputs(factor=8)
    cn = ControlNet.from_unet(unet, downsampling_factor=4)
    with pytest.raises(ValueError, match="the hint must be 4× the latent's resolution"):
        cn(x, hint, t, ctx)


def test_from_unet_copies_encoder_weights_and_keeps_them_separate():
    unet, *_ = unet_and_inputs(num_classes=3)
    cn = ControlNet.from_unet(unet, hint_channels=1, downsampling_factor=2)
    unet_sd, cn_sd = unet.state_dict(), cn.state_dict()
    copied = [k for k in unet_sd if k.split(".")[0] in ("time_embed", "label_emb", "input_blocks", "middle_block")]
    assert any(k.startswith("label_emb") for k in copied) and len(copied) > 20
    for key in copied:
        assert torch.equal(cn_sd[key], unet_sd[key]), key
    assert cn.input_hint_block[0].weight.shape == (16, 1, 3, 3)
    with torch.no_grad():
        cn.input_blocks[0][0].weight.add_(1.0)
    assert not torch.equal(cn.input_blocks[0][0].weight, unet.input_blocks[0][0].weight)


def test_copy_unet_weights_is_strict():
    unet, *_ = unet_and_inputs()
    other = ControlNet(**{**TINY, "model_channels": 64}, hint_channels=3)
    with pytest.raises(ValueError, match="does not match the U-Net's"):
        copy_unet_weights(other, unet)
    with pytest.raises(ValueError, match="label_emb"):
        copy_unet_weights(ControlNet(**TINY, hint_channels=3, num_classes=2), unet)


def test_control_scales_and_guess_mode():
    scales = guess_mode_scales(13)
    assert len(scales) == 13 and scales[-1] == 1.0 and scales[0] == pytest.approx(0.825**12)
    assert guess_mode_scales(4, strength=2.0) == pytest.approx([2 * 0.825**3, 2 * 0.825**2, 2 * 0.825, 2.0])
    residuals = [torch.ones(1, 2), 2 * torch.ones(1, 2)]
    assert [r[0, 0].item() for r in apply_control_scales(residuals, 0.5)] == [0.5, 1.0]
    assert [r[0, 0].item() for r in apply_control_scales(residuals, [3.0, 0.0])] == [3.0, 0.0]
    with pytest.raises(ValueError, match="3 scales for 2 residuals"):
        apply_control_scales(residuals, [1.0, 1.0, 1.0])


def test_builds_from_a_config_node():
    node = {"target": "ldm.nets.controlnet.ControlNet", "params": {**TINY, "hint_channels": 3, "downsampling_factor": 4}}
    cn = instantiate_from_config(node, "model.params.control_stage")
    assert isinstance(cn, ControlNet) and cn.downsampling_factor == 4
