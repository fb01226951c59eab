"""scripts/export.py: a trained run → one .safetensors in the public SD layout → loaded back, same images."""

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file as read_tensors
from safetensors.torch import save_file

from ldm.core.config import check_config, load_config, save_config
from ldm.inference.export import export_checkpoint
from ldm.inference.pipeline import Pipeline
from ldm.inference.sd import METADATA_CONFIG, load_sd
from ldm.io import checkpoints
from ldm.io.checkpoints import (
    CheckpointError,
    ema_shadow_key,
    load_file,
    state_dict_of,
    strip_prefix,
)
from ldm.io.runs import checkpoint_for
from ldm.io.safe_pickle import torch_load
from scripts.export import main as export_main
from tests.components import shared_run_pipeline
from tests.sd_toy import public_state, tiny_config, tiny_system

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]
DRAW = dict(steps=3, sampler="ddim", seed=7, guidance=3.0)
PUBLIC_PREFIXES = {"model", "model_ema", "first_stage_model", "cond_stage_model"}
EXTRA_KEYS = {"scale_factor", "image_size", "betas", "alphas_cumprod"}


@pytest.fixture(scope="module")
def run_state(toy_ldm_run):
    return state_dict_of(load_file(checkpoint_for(toy_ldm_run)))


@pytest.fixture(scope="module")
def reference_images(toy_ldm_run):
    """What the run draws when loaded the project's own way (EMA weights)."""
    return np.stack([np.asarray(im) for im in shared_run_pipeline(toy_ldm_run)(PROMPTS, **DRAW)])


def draw(system) -> np.ndarray:
    return np.stack([np.asarray(im) for im in Pipeline.from_system(system)(PROMPTS, **DRAW)])


def test_export_keeps_the_public_layout_and_reloads_to_the_same_images(toy_ldm_run, tmp_path, reference_images,
                                                                       run_state):
    out = tmp_path / "tiny-ldm.safetensors"
    assert export_main([str(toy_ldm_run), "--out", str(out)]) == 0
    tensors = read_tensors(str(out))
    assert {k.split(".")[0] for k in tensors if k not in EXTRA_KEYS} == PUBLIC_PREFIXES
    assert EXTRA_KEYS <= set(tensors)
    assert all(torch.equal(tensors[k], v) for k, v in run_state.items())  # every weight, unchanged
    with safe_open(str(out), framework="pt") as f:
        carried = yaml.safe_load(f.metadata()[METADATA_CONFIG])
    sidecar = load_config(out.with_suffix(".yaml"))
    assert carried == sidecar and set(sidecar) == {"name", "model"}
    check_config(sidecar["model"], "model")
    assert isinstance(sidecar["model"]["params"]["first_stage"], dict)  # the VAE run inlined: self-contained
    for config in (None, out.with_suffix(".yaml")):  # the file's own config, or the one beside it
        model = load_sd(config, out)
        assert model.checkpoint_info["ema"]
        np.testing.assert_array_equal(draw(model), reference_images)


def test_ema_only_writes_the_ema_weights_as_the_unets(toy_ldm_run, tmp_path, reference_images, run_state):
    out = tmp_path / "tiny-emaonly.safetensors"
    assert export_main([str(toy_ldm_run), "--out", str(out), "--ema-only"]) == 0
    tensors = read_tensors(str(out))
    assert not any(k.startswith("model_ema.") for k in tensors)
    unet = [k for k in run_state if k.startswith("model.diffusion_model.")]
    assert all(torch.equal(tensors[k], run_state[ema_shadow_key(k)]) for k in unet)
    model = load_sd(out.with_suffix(".yaml"), out)
    assert not model.checkpoint_info["ema"]  # nothing to choose: the U-Net's weights are the EMA ones
    np.testing.assert_array_equal(draw(model), reference_images)


def test_no_ema_and_half(toy_ldm_run, tmp_path, run_state, monkeypatch):
    out = tmp_path / "tiny-raw-fp16.safetensors"
    reads = []
    monkeypatch.setattr(checkpoints, "torch_load",
                        lambda path, *a, **k: reads.append(path) or torch_load(path, *a, **k))
    assert export_main([str(toy_ldm_run), "--out", str(out), "--no-ema", "--half"]) == 0
    assert reads.count(checkpoint_for(toy_ldm_run)) == 1  # the VAE-link check and the export read the run once
    tensors = read_tensors(str(out))
    assert not any(k.startswith("model_ema.") for k in tensors)
    assert tensors["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert tensors["scale_factor"].dtype == torch.float32 and tensors["scale_factor"] == run_state["scale_factor"]
    model = load_sd(None, out)
    raw = run_state["model.diffusion_model.out.2.weight"]
    torch.testing.assert_close(model.model.diffusion_model.out[2].weight, raw.half().float(), rtol=0, atol=0)
    assert float(model.scale_factor) == float(run_state["scale_factor"])


def test_sd1_checkpoint_reexports_to_its_own_layout(tmp_path):
    """An SD1-style file (HF CLIP names) → load → export --ema-only → same key layout as an -emaonly file."""
    system = tiny_system("v1-inference", seed=6)
    state = public_state(system)
    src = tmp_path / "tiny-sd1.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(src))
    config = tmp_path / "tiny-v1.yaml"
    save_config(tiny_config("v1-inference"), config)
    out = tmp_path / "tiny-sd1-emaonly.safetensors"
    export_checkpoint(src, out, config=config, ema="only")
    tensors = read_tensors(str(out))
    assert set(tensors) - {"scale_factor", "image_size"} == {k for k in state if not k.startswith("model_ema.")}
    a, b = load_sd(config, src), load_sd(None, out)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    with torch.no_grad():
        context = a.cond_stage_model(PROMPTS[:1])
        torch.testing.assert_close(b.cond_stage_model(PROMPTS[:1]), context, rtol=0, atol=0)
        sa, sb = a.model.diffusion_model.state_dict(), b.model.diffusion_model.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # the very same weights
        # the same outputs, up to fp32 noise: oneDNN may pick other kernels for tensors that live elsewhere in memory
        torch.testing.assert_close(b.model.diffusion_model(x, t, context), a.model.diffusion_model(x, t, context),
                                   rtol=0, atol=1e-5)


def test_a_controlnet_exports_as_its_own_small_file(tmp_path):
    control = tiny_system("controlnet-v1", seed=8)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": control.state_dict(), "global_step": 3}, ckpt)
    config = tmp_path / "controlnet.yaml"
    save_config(tiny_config("controlnet-v1"), config)
    out = tmp_path / "control-tiny.safetensors"
    assert export_main([str(ckpt), "--config", str(config), "--out", str(out), "--controlnet-only"]) == 0
    tensors = read_tensors(str(out))
    assert tensors and all(k.startswith("control_model.") for k in tensors)
    assert set(strip_prefix(tensors, "control_model.")) == set(control.control_model.state_dict())
    sd = tmp_path / "sd.safetensors"
    save_file({k: v.contiguous() for k, v in public_state(control, ema_seed=None).items()
               if not k.startswith("control_model.")}, str(sd))
    model = load_sd(tiny_config("v1-inference"), sd, controlnet=out)
    x, t, hint = torch.randn(1, 4, 8, 8), torch.tensor([20.0]), torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        context = control.cond_stage_model(PROMPTS[:1])
        mine, original = model.control_model.state_dict(), control.control_model.state_dict()
        assert all(torch.equal(mine[k], original[k]) for k in original)  # the very same weights
        for ours, theirs in zip(model.control_model(x, hint, t, context), control.control_model(x, hint, t, context)):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)  # fp32 noise of kernel choice, as above


def test_bad_requests_exit_2_with_a_message(toy_ldm_run, tmp_path, capsys):
    assert export_main([str(toy_ldm_run), "--out", str(tmp_path / "x.ckpt")]) == 2
    assert "safetensors" in capsys.readouterr().err
    assert export_main([str(toy_ldm_run), "--out", str(tmp_path / "c.safetensors"), "--controlnet-only"]) == 2
    assert "no ControlNet" in capsys.readouterr().err
    assert export_main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "y.safetensors")]) == 2
    for lora_flag in (["--lora-layout", "kohya"], ["--merge"]):
        assert export_main([str(toy_ldm_run), "--out", str(tmp_path / "l.safetensors"), *lora_flag]) == 2
        assert "are for LoRA runs" in capsys.readouterr().err
    raw = tmp_path / "raw.safetensors"
    export_checkpoint(toy_ldm_run, raw, ema="drop")
    with pytest.raises(CheckpointError, match="no EMA"):  # a raw-only file has no EMA left to promote
        export_checkpoint(raw, tmp_path / "again.safetensors", config=raw.with_suffix(".yaml"), ema="only")
