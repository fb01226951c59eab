"""configs/sd/*: valid configs holding only `name` + `model`, whose models (built on the meta device, nothing
allocated) match the public SD v1.x / v2.x / ControlNet layouts key for key and shape for shape."""

import json

import pytest
import torch

from ldm.core.config import check_config, load_config
from ldm.inference.export import public_state_dict, text_layout_for
from ldm.inference.sd import SD_CONFIG_DIR, build_sd
from ldm.io.checkpoints import CONTROL_PREFIX, UNET_PREFIX, VAE_PREFIX
from ldm.nets.conditioning.openclip import FrozenOpenCLIP
from ldm.systems.controlnet import ControlLDM
from tests.paths import REPO_ROOT

CONFIGS = ["v1-inference", "v2-inference", "v2-inference-v", "controlnet-v1"]
FINETUNE_CONFIGS = ["finetune-v1", "finetune-v1-lora", "finetune-v2-v", "finetune-v2-v-lora"]  # tests/training/test_sd_finetune.py
XL_CONFIGS = ["xl-base-inference"]  # tests/inference/test_sdxl.py
XL_FINETUNE_CONFIGS = ["finetune-xl", "finetune-xl-lora"]  # tests/training/test_sdxl_finetune.py
INPAINTING_CONFIGS = ["v1-inpainting-inference"]  # tests/inference/test_inpainting_sd.py
SD_SCALE_FACTOR = 0.18215
LAYOUTS = {  # config → (U-Net reference, parameters)
    "v1-inference": ("sd15_unet.json", 859_520_964),
    "v2-inference": ("sd21_unet.json", 865_910_724),
    "v2-inference-v": ("sd21_unet.json", 865_910_724),
    "controlnet-v1": ("sd15_unet.json", 859_520_964),
}
VAE_PARAMS = 83_653_863
CONTROLNET_PARAMS = 361_279_120
TEXT = {  # config → (open_clip arch, layer, width, HF-named SD1 layout?)
    "v1-inference": ("ViT-L-14", "last", 768, True),
    "v2-inference": ("ViT-H-14", "penultimate", 1024, False),
    "v2-inference-v": ("ViT-H-14", "penultimate", 1024, False),
    "controlnet-v1": ("ViT-L-14", "last", 768, True),
}
SD1_TEXT_TENSORS = 196  # CLIPTextModel ViT-L/14: 2 embeddings, 12 layers × 16, final LayerNorm × 2
SD2_TEXT_TENSORS = 294  # OpenCLIP ViT-H/14 text: 2 embeddings, 24 layers × 12, ln_final × 2, projection, logit scale


def reference(name: str) -> dict:
    for folder in (REPO_ROOT.parent / "shared" / "reference", REPO_ROOT / "shared" / "reference"):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    pytest.skip(f"reference layout {name} not found")  # pragma: no cover


@pytest.fixture(scope="module", params=CONFIGS)
def built(request):
    """(config name, model built on the meta device, its state dict)."""
    model = build_sd(SD_CONFIG_DIR / f"{request.param}.yaml", on_meta=True)
    return request.param, model, model.state_dict()


def assert_layout(state: dict, prefix: str, ref: dict, n_params: int) -> None:
    ours = {k: list(v.shape) for k, v in state.items() if k.startswith(prefix)}
    assert sorted(set(ref["shapes"]) - set(ours)) == []
    assert sorted(set(ours) - set(ref["shapes"])) == []
    assert {k: v for k, v in ours.items() if v != ref["shapes"][k]} == {}
    assert sum(state[k].numel() for k in ours) == n_params == ref["parameters"]
    assert len(ours) == ref["tensors"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_holds_only_name_and_model_and_passes_the_check(name):
    cfg = load_config(SD_CONFIG_DIR / f"{name}.yaml")
    assert set(cfg) == {"name", "model"}
    check_config(cfg["model"], "model")
    params = cfg["model"]["params"]
    assert params["scale_factor"] == SD_SCALE_FACTOR and params["ema"] is None
    assert params["cond_stage"]["params"]["pretrained"] is None
    assert params["unet"]["params"]["context_dim"] == TEXT[name][2]


def test_every_sd_config_is_tested():
    assert sorted(p.stem for p in SD_CONFIG_DIR.glob("*.yaml")) == sorted(CONFIGS + FINETUNE_CONFIGS + XL_CONFIGS
                                                                         + XL_FINETUNE_CONFIGS + INPAINTING_CONFIGS)


def test_unet_and_vae_match_the_public_layouts(built):
    name, model, state = built
    assert all(t.is_meta for k, t in state.items() if k not in ("scale_factor", "image_size"))  # nothing allocated
    file, n_params = LAYOUTS[name]
    assert_layout(state, UNET_PREFIX, reference(file), n_params)
    assert_layout(state, VAE_PREFIX, reference("sd_vae.json"), VAE_PARAMS)
    assert model.first_stage_model.downsampling_factor == 8


def test_text_encoder_and_sampling_settings(built):
    name, model, state = built
    arch, layer, width, hf = TEXT[name]
    encoder = model.cond_stage_model
    assert isinstance(encoder, FrozenOpenCLIP) and encoder.layer == layer and encoder.context_dim == width
    assert encoder.max_length == 77 and encoder.frozen
    assert encoder.tokenizer.pad_token_id == (49407 if hf else 0)
    public = public_state_dict({k: v for k, v in state.items() if k.startswith("cond_stage_model.")},
                               text_layout=text_layout_for(load_config(SD_CONFIG_DIR / f"{name}.yaml")["model"]))
    if hf:  # SD1 files name the text model as transformers' CLIPTextModel does
        assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in public)
        assert len(public) == SD1_TEXT_TENSORS
        embedding = public["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
        assert tuple(embedding.shape) == (49408, 768)
    else:  # SD2 files keep open_clip's names under cond_stage_model.model.
        assert len(public) == SD2_TEXT_TENSORS
        assert tuple(public["cond_stage_model.model.text_projection"].shape) == (1024, 1024)
        last_block = public["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"]
        assert tuple(last_block.shape) == (3072, 1024)
    assert float(model.scale_factor) == pytest.approx(SD_SCALE_FACTOR)
    expected = {"v2-inference-v": ("v", 768)}.get(name, ("eps", 512))
    assert (model.parameterization, int(model.image_size)) == expected
    sched = model.schedule
    assert sched.num_timesteps == 1000
    torch.testing.assert_close(sched.betas[[0, -1]], torch.tensor([0.00085, 0.012]), rtol=1e-5, atol=0)


def test_controlnet_config_matches_controlnet_v1(built):
    name, model, state = built
    if name != "controlnet-v1":
        assert not any(k.startswith(CONTROL_PREFIX) for k in state)
        return
    assert isinstance(model, ControlLDM) and model.control_key == "hint" and not model.only_mid_control
    assert_layout(state, CONTROL_PREFIX, reference("controlnet_sd15.json"), CONTROLNET_PARAMS)
    assert model.control_model.downsampling_factor == 8 and model.control_model.hint_channels == 3


def test_a_plain_sd_config_gains_a_controlnet_shaped_like_its_unet():
    model = build_sd(SD_CONFIG_DIR / "v1-inference.yaml", on_meta=True, control=True)
    assert isinstance(model, ControlLDM)
    assert_layout(model.state_dict(), CONTROL_PREFIX, reference("controlnet_sd15.json"), CONTROLNET_PARAMS)
