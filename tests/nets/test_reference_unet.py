"""SD v1.x / v2.x U-Nets and ControlNet v1.0 built on the meta device match the public checkpoints' layouts."""

import json

import pytest
import torch

from ldm.bench.mapping import diffusers_unet_config
from ldm.core.config import load_config
from ldm.nets.controlnet import ControlNet
from ldm.nets.unet.model import UNetModel
from tests.paths import REPO_ROOT

# The layouts live in the team's shared folder, beside the checkout or inside it (device machines).
REFERENCE_DIRS = (REPO_ROOT.parent / "shared" / "reference", REPO_ROOT / "shared" / "reference")

SD_CONFIGS = REPO_ROOT / "configs" / "sd"


def _net_params(config: str, node: str) -> dict:
    """The constructor params of a network node of an SD inference config (configs/sd/<config>)."""
    return load_config(SD_CONFIGS / config)["model"]["params"][node]["params"]


# Stable Diffusion v1.x U-Net (SD's v1-inference.yaml's unet_config.params, minus use_checkpoint / use_fp16).
SD15_UNET = _net_params("v1-inference.yaml", "unet")
# Stable Diffusion v2.x U-Net: 64-channel heads, OpenCLIP ViT-H context, Linear proj_in / proj_out.
SD21_UNET = _net_params("v2-inference.yaml", "unet")
# ControlNet v1.0 / v1.1 for SD1.5 (cldm_v15.yaml's control_stage_config): the SD1.5 encoder, a 3-channel hint, f = 8.
CONTROLNET_SD15 = _net_params("controlnet-v1.yaml", "control_stage")

CONTROLNET_SD15_SIZE = (340, 361_279_120)  # tensors, parameters


def _reference(name: str) -> dict | None:
    for folder in REFERENCE_DIRS:
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    return None


def _assert_layout(model: torch.nn.Module, prefix: str, reference: dict | None, tensors: int, n_params: int) -> None:
    state = model.state_dict()
    assert all(t.is_meta for t in state.values())  # nothing was allocated
    assert len(state) == tensors
    assert sum(t.numel() for t in state.values()) == n_params
    if reference is None:
        pytest.skip("reference key/shape layout not found; counts checked only")  # pragma: no cover
    shapes = {prefix + k: list(v.shape) for k, v in state.items()}
    missing = sorted(set(reference["shapes"]) - set(shapes))
    unexpected = sorted(set(shapes) - set(reference["shapes"]))
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    wrong = {k: (shapes[k], s) for k, s in reference["shapes"].items() if shapes[k] != s}
    assert not wrong, f"shape mismatches (ours, reference): {dict(list(wrong.items())[:5])}"
    assert (reference["tensors"], reference["parameters"]) == (tensors, n_params)


@pytest.mark.parametrize(
    "params, file, n_params",
    [(SD15_UNET, "sd15_unet.json", 859_520_964), (SD21_UNET, "sd21_unet.json", 865_910_724)],
    ids=["sd15", "sd21"],
)
def test_sd_unet_matches_the_public_checkpoint(params, file, n_params):
    with torch.device("meta"):
        unet = UNetModel(**params)
    _assert_layout(unet, "model.diffusion_model.", _reference(file), 686, n_params)


def test_controlnet_matches_the_public_checkpoint():
    with torch.device("meta"):
        controlnet = ControlNet(**CONTROLNET_SD15)
    _assert_layout(controlnet, "control_model.", _reference("controlnet_sd15.json"), *CONTROLNET_SD15_SIZE)
    assert len(controlnet.zero_convs) + 1 == 13  # 13 residuals for SD


def test_controlnet_from_sd15_unet_matches_the_public_checkpoint():
    with torch.device("meta"):
        unet = UNetModel(**SD15_UNET)
    controlnet = ControlNet.from_unet(unet, hint_channels=3, downsampling_factor=8)
    _assert_layout(controlnet, "control_model.", _reference("controlnet_sd15.json"), *CONTROLNET_SD15_SIZE)


# ---------------------------------------------------------------- numerical equivalence with diffusers (if present)

TINY_SD = dict(
    image_size=8, in_channels=4, model_channels=32, num_res_blocks=1, attention_resolutions=[1, 2],
    channel_mult=[1, 2], use_spatial_transformer=True, transformer_depth=1, context_dim=16, legacy=False,
)


def _tiny_params(use_linear: bool) -> dict:
    heads = {"num_head_channels": 16} if use_linear else {"num_heads": 2}  # 2 heads at 32 ch, 4 (or 2) at 64
    return {**TINY_SD, **heads, "use_linear_in_transformer": use_linear}


def _diffusers_config(use_linear: bool) -> dict:
    """diffusers' description of TINY_SD, by the mapping the benchmark shares (ldm.bench.mapping)."""
    return diffusers_unet_config({**_tiny_params(use_linear), "out_channels": 4})


# The UNet2DConditionModel arguments diffusers' ControlNetModel also takes (it has no decoder, no output).
CONTROLNET_KEYS = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
                   "attention_head_dim", "use_linear_projection", "transformer_layers_per_block")


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # zero-initialised layers: give them values so the comparison means something
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _tiny_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.5, 700.0]), torch.randn(2, 3, 16, generator=g)


@pytest.mark.parametrize("use_linear", [False, True], ids=["sd1-conv", "sd2-linear"])
def test_unet_equals_diffusers_unet_with_converted_weights(use_linear):
    """Our state dict, converted by diffusers' own SD-checkpoint converter, gives diffusers' U-Net our outputs."""
    diffusers = pytest.importorskip("diffusers")
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    torch.manual_seed(0)
    ours = _randomized(UNetModel(**_tiny_params(use_linear), out_channels=4))
    config = _diffusers_config(use_linear)
    theirs = diffusers.UNet2DConditionModel(**config).eval()
    state = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(single_file.convert_ldm_unet_checkpoint(state, config), strict=True)
    x, t, ctx = _tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, ctx), theirs(x, t, ctx).sample, atol=1e-5, rtol=1e-5)


def test_controlnet_equals_diffusers_controlnet_with_converted_weights():
    diffusers = pytest.importorskip("diffusers")
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    torch.manual_seed(0)
    ours = _randomized(ControlNet(**_tiny_params(False), hint_channels=3, downsampling_factor=8))
    config = {**{k: _diffusers_config(False)[k] for k in CONTROLNET_KEYS}, "conditioning_channels": 3}
    theirs = diffusers.ControlNetModel(**config).eval()
    state = {"control_model." + k: v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(single_file.convert_controlnet_checkpoint(state, config), strict=True)
    x, t, ctx = _tiny_inputs()
    hint = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        down, mid = theirs(x, t, ctx, hint, return_dict=False)
        residuals = ours(x, hint, t, ctx)
    assert len(residuals) == len(down) + 1
    for a, b in zip(residuals, [*down, mid]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
