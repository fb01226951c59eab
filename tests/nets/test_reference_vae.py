"""An AutoencoderKL built from SD's ddconfig has exactly SD's VAE state-dict layout (no weights allocated)."""

import json

import torch

from ldm.nets.autoencoder.model import AutoencoderKL
from tests.paths import REPO_ROOT

REFERENCE = REPO_ROOT.parent / "shared" / "reference" / "sd_vae.json"
PREFIX = "first_stage_model."
SD_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                   num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def _reference() -> dict:
    path = REFERENCE if REFERENCE.is_file() else REPO_ROOT / "shared" / "reference" / "sd_vae.json"
    return json.loads(path.read_text())


def test_sd_vae_keys_shapes_and_parameter_count():
    ref = _reference()
    with torch.device("meta"):
        model = AutoencoderKL(SD_DDCONFIG, embed_dim=4)
    ours = {PREFIX + k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ref["shapes"]) - set(ours)) == []
    assert sorted(set(ours) - set(ref["shapes"])) == []
    assert {k: v for k, v in ours.items() if v != ref["shapes"][k]} == {}
    assert len(ours) == ref["tensors"] == 248
    assert sum(p.numel() for p in model.parameters()) == ref["parameters"] == 83_653_863
    assert model.downsampling_factor == 8


def test_gpu_config_builds_sd_layout():
    """configs/vae/kl-f8-256.yaml passes the config check and builds SD's VAE (LPIPS off: no VGG weights here)."""
    from ldm.core.config import instantiate_from_config, load_config
    from ldm.training.driver import validate

    cfg = load_config(REPO_ROOT / "configs" / "vae" / "kl-f8-256.yaml", ["model.params.loss.params.perceptual_weight=0"])
    validate(cfg)
    with torch.device("meta"):
        model = instantiate_from_config(cfg["model"], "model")
    nets = {PREFIX + k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith("loss.")}
    assert nets == _reference()["shapes"]
