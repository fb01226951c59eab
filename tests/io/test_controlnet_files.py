"""ControlNet files through the public path: v1.0 (SD + ControlNet in one file) and v1.1 (a separate file, prefixed or
bare) load into the control model; a ControlNet copied from an SD file's U-Net starts as a no-op; residuals are added
scaled; stage 3 starts from an SD file with a ControlNet made from its U-Net."""

import pytest
import torch

from ldm.core.config import instantiate_from_config
from ldm.inference.sd import load_sd, load_sd_weights, read_model_config
from ldm.inference.sd_control import controlnet_from_sd, sampling_model
from ldm.io.checkpoints import strip_prefix
from ldm.io.module_weights import meta_tensor_names, params_on_meta
from ldm.nets.controlnet import ControlledDiffusion
from ldm.systems.controlnet import ControlLDM
from tests.io.sd_files import PROMPTS, inputs, save
from tests.sd_toy import public_state, tiny_config


def residuals(model, x, t, hint, context):
    with torch.no_grad():
        return model.control_model(x, hint, t, context)


@pytest.fixture(scope="module")
def control_file_state(control_system):
    """``control_system``'s weights as a public SD + ControlNet file holds them (only read)."""
    return public_state(control_system, ema_seed=None)


@pytest.mark.parametrize("layout", ["v1.0-full", "v1.1-prefixed", "v1.1-bare"])
def test_controlnet_files_load_into_control_model(control_system, control_file_state, tmp_path, layout):
    state = control_file_state
    control = {k: v for k, v in state.items() if k.startswith("control_model.")}
    if layout == "v1.0-full":  # SD + ControlNet in one file, loaded with the ControlNet config
        model = load_sd(tiny_config("controlnet-v1"), save(state, tmp_path / "control_sd15.pth", "ckpt"))
    else:  # an SD file + a ControlNet file, with the plain SD config
        sd = {k: v for k, v in state.items() if k not in control}
        cn = control if layout == "v1.1-prefixed" else strip_prefix(control, "control_model.")
        model = load_sd(tiny_config("v1-inference"), save(sd, tmp_path / "sd.safetensors", "safetensors"),
                        controlnet=save(cn, tmp_path / "control_v11p.pth", "ckpt"))
    assert isinstance(model, ControlLDM) and model.only_mid_control is False
    x, t, hint = inputs(2)
    context = control_system.cond_stage_model(PROMPTS)
    for ours, theirs in zip(residuals(model, x, t, hint, context), residuals(control_system, x, t, hint, context)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_controlnet_from_sd_copies_the_encoder_and_starts_as_a_no_op(sd1_model):
    model = sd1_model  # only read: the ControlNet copies its U-Net's weights
    controlnet = controlnet_from_sd(model)
    unet = model.model.diffusion_model
    for name in ("time_embed", "input_blocks", "middle_block"):
        ours, theirs = getattr(controlnet, name).state_dict(), getattr(unet, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(not p.any() for p in controlnet.zero_convs.parameters())
    assert controlnet.downsampling_factor == model.first_stage_model.downsampling_factor == 2
    x, t, hint = inputs(3)
    context = model.cond_stage_model(PROMPTS)
    controlled = ControlledDiffusion(unet, controlnet, strength=0.7)
    with torch.no_grad():
        torch.testing.assert_close(controlled(x, t, context, hint=hint), unet(x, t, context), rtol=0, atol=0)
    assert sampling_model(model) is model.model  # no ControlNet: the plain model


def test_controlled_diffusion_adds_scaled_residuals(control_system):
    x, t, hint = inputs(5)
    unet, control = control_system.model.diffusion_model, control_system.control_model
    context = control_system.cond_stage_model(PROMPTS)
    model = sampling_model(control_system, strength=0.5)
    with torch.no_grad():
        res = [r * 0.5 for r in control(x, hint, t, context)]
        torch.testing.assert_close(model(x, t, context, hint=hint), unet(x, t, context, control=res))
        torch.testing.assert_close(model(x, t, context), unet(x, t, context))
        assert (model(x, t, context, hint=hint) - unet(x, t, context)).abs().max() > 1e-4


def test_a_training_system_takes_an_sd_base_with_a_controlnet_from_its_unet(sd1_file):
    """Stage 3's start: a ControlLDM built on the meta device that keeps an EMA, an SD file as its base."""
    node = read_model_config(tiny_config("controlnet-v1"))
    node["params"]["ema"] = {"target": "ldm.nets.ema.EMA"}
    with params_on_meta():
        system = instantiate_from_config(node, "model")
    info = load_sd_weights(system, sd1_file, control_from_unet=True)
    assert info["ema"] and "control_model.* (from the U-Net)" in info["filled"] and not meta_tensor_names(system)
    unet, control = system.model.diffusion_model, system.control_model
    for name in ("time_embed", "input_blocks", "middle_block"):
        ours, theirs = getattr(control, name).state_dict(), getattr(unet, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) and ours[k].data_ptr() != theirs[k].data_ptr() for k in ours)
    assert all(not p.any() for p in [*control.zero_convs.parameters(), *control.middle_block_out.parameters()])
    hint_convs = [m for m in control.input_hint_block if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.std() > 0 for c in hint_convs[:-1]) and not hint_convs[-1].weight.any()
    shadows = dict(system.model_ema.named_buffers())
    for name, shadow in system.model_ema.m_name2s_name.items():
        assert torch.equal(shadows[shadow], system.model.get_parameter(name)), name


