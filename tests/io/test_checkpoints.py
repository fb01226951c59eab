"""Safe checkpoint loading and Stable Diffusion files through the public path (ldm.inference.sd.load_sd); ControlNet
files are tests/io/test_controlnet_files.py's.

Toy models keep the public key structure (tests/sd_toy.py); files are written as .safetensors and .ckpt.
"""

import copy
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from ldm.inference.sd import SD_CONFIG_DIR, describe_sd, load_component, load_sd
from ldm.io.checkpoints import IGNORED_KEYS, CheckpointError, checkpoint_kind, load_file, state_dict_of, strip_prefix
from ldm.io.module_weights import meta_tensor_names, params_on_meta
from ldm.io.safe_pickle import PickledClassStandIn
from ldm.nets.unet.model import UNetModel
from tests.sd_toy import (
    SD_SCHEDULE_KEYS,
    ema_unet_state,
    public_state,
    randomize,
    tiny_config,
)
from tests.io.sd_files import PROMPTS, inputs, save


# ---------------------------------------------------------------------------------------------- load_file


class WritesAFile:
    """Unpickling this runs code: it writes the marker file (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_a_pickle_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path, legacy):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": torch.zeros(2)}, "callback": WritesAFile(marker)}
    if legacy:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)  # torch.load's own default protocol
    else:
        torch.save(payload, path)
    for mmap in (False, True):
        with pytest.raises(CheckpointError, match="--unsafe-load"):
            load_file(path, mmap=mmap)
    with pytest.raises(CheckpointError, match="--unsafe-load"):
        load_sd(tiny_config("v1-inference"), path)
    assert not marker.exists()
    if not legacy:  # the payload is real: a user who opts in gets it run
        load_file(path, unsafe=True)
        assert marker.read_text() == "pwned"


def test_lightning_era_checkpoints_load_without_unsafe(tmp_path, monkeypatch):
    """sd-v1-4.ckpt & co.: PyTorch Lightning 1.x keyed `callbacks` by the callback class, scores were numpy
    scalars. Those globals unpickle to inert stand-ins (the class is not even importable at load time)."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    callback = type("ModelCheckpoint", (), {"__module__": module.__name__})
    module.ModelCheckpoint = callback
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    weights = {"model.diffusion_model.out.2.bias": torch.arange(4.0)}
    torch.save({"state_dict": weights, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
                "callbacks": {callback: {"best_model_score": np.float64(0.25), "monitor": "val/loss"}}},
               tmp_path / "sd-v1-4-like.ckpt")
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.delitem(sys.modules, name)
    loaded = load_file(tmp_path / "sd-v1-4-like.ckpt", mmap=True)
    assert torch.equal(state_dict_of(loaded)["model.diffusion_model.out.2.bias"], torch.arange(4.0))
    [(key, state)] = loaded["callbacks"].items()
    assert key is PickledClassStandIn and state["best_model_score"] == 0.25


def test_safetensors_ckpt_and_legacy_pickles_load_alike(tmp_path):
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}
    loaded = [state_dict_of(load_file(save(state, tmp_path / "w.safetensors", "safetensors")))]
    loaded.append(state_dict_of(load_file(save(state, tmp_path / "w.ckpt", "ckpt"), mmap=True)))
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    loaded.append(load_file(tmp_path / "old.pt", mmap=True))  # mmap falls back for non-zip pickles
    for got in loaded:
        assert got.keys() == state.keys()
        assert all(torch.equal(got[k], state[k]) and got[k].dtype == state[k].dtype for k in state)


def test_unreadable_files_are_reported(tmp_path):
    (tmp_path / "cut.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00")
    for name in ("cut.ckpt", "cut.safetensors", "absent.ckpt"):
        with pytest.raises(CheckpointError, match=name):
            load_file(tmp_path / name)


# ---------------------------------------------------------------------------------------------- kinds


def test_checkpoint_kinds_and_the_diffusers_layout_is_refused_by_name(sd1, control_system, tmp_path):
    state = sd1[1]
    assert checkpoint_kind(state) == "full"
    assert checkpoint_kind(strip_prefix(state, "model.diffusion_model.")) == "unet"
    assert checkpoint_kind({**strip_prefix(state, "first_stage_model."), "loss.logvar": torch.zeros(())}) == "vae"
    control = control_system.state_dict()
    assert checkpoint_kind({k: v for k, v in control.items() if k.startswith("control_model.")}) == "controlnet"
    assert checkpoint_kind(strip_prefix(control, "control_model.")) == "controlnet"
    diffusers = {"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1), "conv_in.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="diffusers"):
        checkpoint_kind(diffusers)
    folder = tmp_path / "stable-diffusion-v1-5"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="diffusers"):
        load_sd(tiny_config("v1-inference"), folder)


def test_a_bare_component_file_is_not_taken_for_a_whole_model(sd1, tmp_path):
    vae = save(strip_prefix(sd1[1], "first_stage_model."), tmp_path / "vae.safetensors", "safetensors")
    with pytest.raises(CheckpointError, match="bare vae file: pass it as vae="):
        load_sd(tiny_config("v1-inference"), vae)


# ---------------------------------------------------------------------------------------------- load_sd


@pytest.fixture(scope="module")
def sd1_outputs(sd1):
    """What the toy SD1 system gives for ``inputs()``: (text context, its EMA U-Net's output, its raw U-Net's, the
    latents decoded), computed once for the file formats."""
    system, state = sd1
    x, t, _ = inputs()
    with torch.no_grad():
        context = system.cond_stage_model(PROMPTS)
        ema = UNetModel(**tiny_config("v1-inference")["model"]["params"]["unet"]["params"])
        ema.load_state_dict(ema_unet_state(state))
        raw = system.model.diffusion_model(x, t, context)
        return context, ema(x, t, context), raw, system.first_stage_model.decode(x)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_full_sd1_checkpoint_loads_with_ema_and_reproduces_every_part(sd1, sd1_model, sd1_outputs, tmp_path, fmt):
    # safetensors: sd1_model, loaded from sd1_file (sd1's state saved as safetensors)
    path = None if fmt == "safetensors" else save(sd1[1], tmp_path / "tiny.ckpt", fmt)
    model = sd1_model if path is None else load_sd(tiny_config("v1-inference"), path)
    info = model.checkpoint_info
    assert info["ema"] and info["text_encoder"] == "hf-clip" and not model.training
    assert set(SD_SCHEDULE_KEYS) | {"model_ema.decay", "model_ema.num_updates"} <= set(info["ignored"])
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in info["ignored"]
    assert set(info["ignored"]) <= IGNORED_KEYS
    assert set(info["filled"]) == {"scale_factor", "image_size", "cond_stage_model.model.text_projection",
                                   "cond_stage_model.model.logit_scale"}
    assert float(model.scale_factor) == pytest.approx(0.18215) and int(model.image_size) == 16
    assert not meta_tensor_names(model)
    x, t, _ = inputs()
    context, expected, raw, decoded = sd1_outputs
    with torch.no_grad():
        torch.testing.assert_close(model.cond_stage_model(PROMPTS), context, rtol=0, atol=0)
        out = model.model.diffusion_model(x, t, context)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert (out - raw).abs().max() > 1e-3  # the EMA weights, not the raw
        torch.testing.assert_close(model.first_stage_model.decode(x), decoded, rtol=0, atol=0)


def test_use_ema_false_takes_the_raw_weights(sd1, sd1_file):
    system, _ = sd1
    model = load_sd(tiny_config("v1-inference"), sd1_file, use_ema=False)
    assert not model.checkpoint_info["ema"]
    assert any(entry.startswith("model_ema.*") for entry in model.checkpoint_info["ignored"])
    loaded = model.model.state_dict()
    for key, value in system.model.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_strict_report_names_the_missing_the_unexpected_and_the_misshapen(sd1, tmp_path):
    state = dict(sd1[1])
    del state["first_stage_model.decoder.conv_out.bias"]
    state["first_stage_model.decoder.extra.weight"] = torch.zeros(3)
    state["model.diffusion_model.out.2.bias"] = torch.zeros(5)
    state["model_ema.diffusion_modelout2bias"] = torch.zeros(5)
    path = save(state, tmp_path / "broken.safetensors", "safetensors")
    with pytest.raises(CheckpointError) as caught:
        load_sd(tiny_config("v1-inference"), path)
    message = str(caught.value)
    assert "missing: first_stage_model.decoder.conv_out.bias" in message
    assert "unexpected: first_stage_model.decoder.extra.weight" in message
    assert "shape mismatch: model.diffusion_model.out.2.bias: file (5,) vs model (4,)" in message


def test_a_partial_ema_is_refused_rather_than_mixed(sd1, tmp_path):
    state = {k: v for k, v in sd1[1].items() if k != "model_ema.diffusion_modelout2weight"}
    path = save(state, tmp_path / "partial-ema.safetensors", "safetensors")
    with pytest.raises(CheckpointError, match="missing: model_ema.diffusion_modelout2weight .*use_ema=False"):
        load_sd(tiny_config("v1-inference"), path)
    assert load_sd(tiny_config("v1-inference"), path, use_ema=False).checkpoint_info["ema"] is False


def test_a_file_of_the_other_sd_version_is_named_in_the_report(sd2, tmp_path):
    path = save(public_state(sd2, hf_text=False), tmp_path / "sd2.safetensors", "safetensors")
    with pytest.raises(CheckpointError, match="proj_in.weight: file .* vs model .*v2-inference.yaml"):
        load_sd(tiny_config("v1-inference"), path)


def test_sd2_openclip_text_encoder_loads_natively_in_the_chosen_dtype(sd2, tmp_path):
    system = sd2
    state = public_state(system, ema_seed=None, hf_text=False)
    assert "cond_stage_model.model.text_projection" in state and "cond_stage_model.model.logit_scale" in state
    model = load_sd(tiny_config("v2-inference"), save(state, tmp_path / "sd2.ckpt", "ckpt"), dtype="bf16")
    assert model.checkpoint_info["text_encoder"] == "native" and not model.checkpoint_info["ema"]
    assert model.checkpoint_info["filled"] == ["image_size", "scale_factor"]
    assert model.model.diffusion_model.out[2].weight.dtype == torch.bfloat16
    assert model.first_stage_model.decoder.conv_out.weight.dtype == torch.bfloat16
    assert model.cond_stage_model.model.token_embedding.weight.dtype == torch.float32  # text stays fp32
    with torch.no_grad():
        torch.testing.assert_close(model.cond_stage_model(PROMPTS), system.cond_stage_model(PROMPTS), rtol=0, atol=0)


def test_a_separate_vae_file_replaces_the_checkpoints(sd1, sd1_file, tmp_path):
    other = randomize(copy.deepcopy(sd1[0].first_stage_model), seed=9)  # another VAE of the same architecture
    bare = {**other.state_dict(), "loss.logvar": torch.zeros(())}  # training leftovers are ignored
    vae_path = save(bare, tmp_path / "vae-ft-mse.ckpt", "ckpt")
    model = load_sd(tiny_config("v1-inference"), sd1_file, vae=vae_path)
    x, _, _ = inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(model.first_stage_model.decode(x), other.decode(x), rtol=0, atol=0)
    existing = copy.deepcopy(sd1[0].first_stage_model)  # the shared system is only read
    load_component(existing, vae_path, "vae")  # a bare VAE into an existing model
    assert all(torch.equal(a, b) for a, b in zip(existing.state_dict().values(), other.state_dict().values()))


def test_schedule_buffers_that_disagree_with_the_config_are_warned_about(sd1, tmp_path):
    state = {**sd1[1], "alphas_cumprod": sd1[1]["alphas_cumprod"] * 0.5}
    with pytest.warns(UserWarning, match="noise schedule"):
        load_sd(tiny_config("v1-inference"), save(state, tmp_path / "odd.safetensors", "safetensors"))


def test_parameters_on_meta_buffers_real_and_no_second_copy(sd1_model):
    with params_on_meta():
        unet = UNetModel(**tiny_config("v1-inference")["model"]["params"]["unet"]["params"])
    assert all(p.is_meta for p in unet.parameters())
    model = sd1_model  # loaded by load_sd
    assert model.cond_stage_model.model.attn_mask.isinf().any()  # a non-persistent buffer, computed, real
    assert not meta_tensor_names(model)


# ---------------------------------------------------------------------------------------------- CLI helpers


def test_describe_sd_reads_the_config_only(sd1_file, tmp_path):
    summary = describe_sd(SD_CONFIG_DIR / "v2-inference-v.yaml", sd1_file)  # the file is not opened
    assert (summary.condition_key, summary.downsampling_factor, summary.image_size, summary.parameterization) == (
        "caption", 8, 768, "v")
    assert summary.checkpoint == sd1_file and summary.controlnet is None
    with pytest.raises(CheckpointError, match="not found"):
        describe_sd(SD_CONFIG_DIR / "v1-inference.yaml", tmp_path / "v1-5-pruned-emaonly.safetensors")


def test_tensors_hash_covers_scalars_and_values():
    from ldm.io.checkpoints import tensors_hash

    base = {"step": torch.tensor(3), "w": torch.ones(2, 2)}
    assert tensors_hash(base) == tensors_hash({k: v.clone() for k, v in base.items()})
    assert tensors_hash(base) != tensors_hash({**base, "step": torch.tensor(4)})
    assert tensors_hash(base) != tensors_hash({**base, "w": torch.ones(4)})  # same bytes, other shape
