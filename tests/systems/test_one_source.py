"""One source for each rule: the ControlNet's architecture is the U-Net's (declared once), one map of EMA modules,
one optimiser vocabulary (old VAE configs migrate to it)."""

from __future__ import annotations

import inspect

import pytest
import torch

from ldm.core.config import ConfigError, check_config, instantiate_from_config, load_config
from ldm.core.migrate import upgrade_config
from ldm.io.checkpoints import EMA_SHADOWED
from ldm.nets.controlnet import ControlNet
from ldm.nets.unet.model import UNetModel, unet_params
from ldm.systems.optim import AdamW
from tests.paths import REPO_ROOT, TINY

UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
            attention_resolutions=[2], channel_mult=[1, 2], num_head_channels=16, use_spatial_transformer=True,
            context_dim=16, legacy=False)


def test_the_controlnet_takes_exactly_the_unet_s_parameters():
    unet_names = set(inspect.signature(UNetModel).parameters)
    control = inspect.signature(ControlNet).parameters
    assert set(control) == unet_names | {"hint_channels", "downsampling_factor"}
    assert control["out_channels"].default is None  # accepted (a U-Net's params reused), not required
    for name in unet_names - {"out_channels"}:
        assert control[name].default == inspect.signature(UNetModel).parameters[name].default, name


def test_a_controlnet_built_from_the_unet_s_config_matches_it():
    unet = UNetModel(**UNET)
    assert unet_params(UNET) == unet.config
    control = ControlNet(3, 2, **unet.config)  # the U-Net's own config object, as is
    for name in ("time_embed", "input_blocks", "middle_block"):
        ours, theirs = getattr(control, name).state_dict(), getattr(unet, name).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert ControlNet.from_unet(unet, downsampling_factor=2).state_dict().keys() == control.state_dict().keys()


def test_a_controlnet_node_is_checked_against_the_unet_s_parameters():
    node = {"target": "ldm.nets.controlnet.ControlNet", "params": {**UNET, "hint_channels": 3}}
    check_config(node, "control_stage")
    with pytest.raises(ConfigError, match=r"control_stage.params.model_chanels: unknown parameter.*model_channels"):
        check_config({**node, "params": {**node["params"], "model_chanels": 8}}, "control_stage")
    with pytest.raises(ValueError, match="ControlNet: missing a required argument: 'model_channels'"):
        ControlNet(3, **{k: v for k, v in UNET.items() if k != "model_channels"})


def test_one_map_of_ema_modules_serves_training_and_loading():
    from ldm.inference import sd_base, sd_layout
    from ldm.systems import controlnet, latent_diffusion

    assert EMA_SHADOWED == {"model_ema": "model", "control_ema": "control_model"}
    for module in (sd_base, sd_layout, latent_diffusion):
        assert "EMA_SHADOWED" in vars(module)
    assert not hasattr(controlnet, "EMA_SOURCES") and not hasattr(controlnet.ControlLDM, "ema_sources")


def test_the_vae_speaks_the_stages_optimiser_vocabulary():
    for path in sorted((REPO_ROOT / "configs" / "vae").glob("*.yaml")) + [TINY / "vae.yaml"]:
        params = load_config(path)["model"]["params"]
        assert not {"learning_rate", "lr_schedule", "disc_learning_rate"} & set(params), path
        assert params["optimizer"]["target"] == "ldm.systems.optim.AdamW", path
    system = instantiate_from_config(load_config(TINY / "vae.yaml")["model"], "model")
    assert system.optimizer_settings == AdamW(lr=1e-3, betas=[0.5, 0.9]) and system.disc_lr == 1e-3


def test_an_old_vae_config_migrates_to_the_optimizer_node():
    old = {"model": {"target": "ldm.systems.autoencoder.AutoencoderKLSystem",
                     "params": {"embed_dim": 4, "learning_rate": 2e-4, "lr_schedule": "cosine", "warmup_steps": 5,
                                "disc_learning_rate": 1e-5}}}
    params = upgrade_config(old)["model"]["params"]
    assert params["optimizer"] == {"target": "ldm.systems.optim.AdamW",
                                   "params": {"lr": 2e-4, "betas": [0.5, 0.9], "decay": "cosine", "warmup_steps": 5}}
    assert params["disc_lr"] == 1e-5 and "learning_rate" not in params


def test_adamw_without_weight_decay_steps_as_adam():
    weights = [torch.nn.Parameter(torch.randn(5)) for _ in range(2)]
    for w in weights:
        w.grad = torch.ones(5)
    ours = AdamW(lr=0.1, betas=(0.5, 0.9)).optimizer([weights[0]])
    adam = torch.optim.Adam([weights[1]], lr=0.1, betas=(0.5, 0.9))
    before = weights[0].detach().clone()
    weights[1].data.copy_(before)
    ours.step()
    adam.step()
    assert torch.allclose(weights[0], weights[1])


def test_the_ema_is_one_small_object_a_system_is_given():
    from ldm.nets.ema import EMA
    from ldm.systems.latent_diffusion import LatentDiffusion

    params = inspect.signature(LatentDiffusion).parameters
    assert "ema" in params and not {"use_ema", "ema_decay"} & set(params)
    cfg = load_config(TINY / "ldm-text.yaml", ["cache.vae=x"])
    assert instantiate_from_config(cfg["model"]["params"]["ema"], "ema") == EMA(decay=0.99)
    with pytest.raises(ValueError, match="EMA decay must be in"):
        EMA(decay=1.5)


@pytest.mark.parametrize("target, old, new", [
    ("ldm.systems.latent_diffusion.LatentDiffusion", {"ema_decay": 0.999},
     {"target": "ldm.nets.ema.EMA", "params": {"decay": 0.999}}),
    ("ldm.systems.latent_diffusion.LatentDiffusion", {"use_ema": False, "ema_decay": 0.9}, None),
    ("ldm.systems.controlnet.ControlLDM", {"ema_decay": 0.9}, None),  # ControlLDM kept none unless use_ema
    ("ldm.systems.controlnet.ControlLDM", {"use_ema": True}, {"target": "ldm.nets.ema.EMA", "params": {}}),
])
def test_old_ema_settings_migrate_to_the_ema_node(target, old, new):
    params = upgrade_config({"model": {"target": target, "params": dict(old)}})["model"]["params"]
    assert params == {"ema": new}
