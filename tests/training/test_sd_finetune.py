"""Stage 2 from a public SD file (toy files of the public layout): the config completed from the base, strict loading
with the file's EMA weights, the cache encoded by the base's VAE (and refusing another), the base's scale factor,
the shipped configs, and a full fine-tune end to end → export → txt2img --ckpt."""


import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm.core.config import ConfigError, instantiate_from_config, load_config
from ldm.data.latents import CacheError, read_meta
from ldm.inference.loaders import build_system, load_autoencoder
from ldm.inference.pipeline import Pipeline
from ldm.inference.sd import load_sd
from ldm.io.checkpoints import (
    FILLED_KEYS,
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    ema_shadow_key,
    load_file,
    state_dict_of,
    strip_prefix,
    tensors_hash,
)
from ldm.io.module_weights import params_on_meta
from ldm.training.cache import ensure_cache
from ldm.training.driver import train
from ldm.training.sd_finetune import complete_from_base, start_from_base
from scripts.export import main as export_main
from tests.conftest import TINY
from tests.finetune_steps import cache_batch, loss_step
from tests.paths import REPO_ROOT
from tests.scripts import load_script
from tests.sd_toy import ema_unet_state, public_state, tiny_system, write_image_folder, write_sd_file
from tests.nets.test_sd_configs import reference

CFG = TINY / "sd-finetune.yaml"
SD_SCALE = 0.18215
PROMPTS = ["a red circle on a blue background", "a zorb"]
DRAW = dict(steps=3, sampler="ddim", seed=5, guidance=3.0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(toy SD 1.x file with an EMA copy, its inference config, a captioned image folder, a work folder)."""
    folder = tmp_path_factory.mktemp("sd-base")
    ckpt, config = write_sd_file(folder, seed=3)
    return ckpt, config, write_image_folder(folder / "images"), folder


def overrides(base, cache: str = "cache", *extra: str) -> list[str]:
    ckpt, config, images, folder = base
    return [f"model.params.base_ckpt={ckpt}", f"model.params.base_config={config}",
            f"cache.data.train.params.root={images}", f"cache.dir={folder / cache}", *extra]


def completed(base, *extra: str) -> dict:
    cfg = load_config(CFG, overrides(base, "cache", *extra))
    complete_from_base(cfg)
    return cfg


def test_the_config_is_completed_from_the_base_under_its_own_settings(base):
    cfg = completed(base, "model.params.objective.params.weighting=min_snr")
    params, base_params = cfg["model"]["params"], load_config(base[1])["model"]["params"]
    assert params["base_ckpt"] == str(base[0].resolve()) and cfg["cache"]["vae"] == params["base_ckpt"]
    assert cfg["cache"]["vae_config"] == params["base_config"] == str(base[1].resolve())
    assert params["scale_factor"] == SD_SCALE and params["image_size"] == base_params["image_size"]
    objective = params["objective"]["params"]
    assert objective["schedule"] == base_params["objective"]["params"]["schedule"]  # the base's schedule …
    assert objective["parameterization"] == "eps" and objective["weighting"] == "min_snr"  # … + the fine-tune's own
    unet = params["unet"]["params"]
    assert unet["use_checkpoint"] is True and unet["model_channels"] == base_params["unet"]["params"]["model_channels"]
    assert params["cond_stage"]["params"]["freeze"] is True and params["cond_stage_trainable"] is False
    trainable = completed(base, "model.params.cond_stage_trainable=true")["model"]["params"]
    assert trainable["cond_stage"]["params"]["freeze"] is False  # a trainable encoder must compute gradients


def test_a_new_run_starts_from_the_base_strictly_with_its_ema_weights(base):
    cfg = completed(base)
    system = build_system(cfg["model"])
    info = start_from_base(system, cfg)
    assert info["ema"] and info["text_encoder"] == "hf-clip"
    state = load_file(base[0])
    unet = system.model.diffusion_model.state_dict()
    assert all(torch.equal(unet[k], v) for k, v in ema_unet_state(state).items())  # the file's EMA weights
    shadows = dict(system.model_ema.named_buffers())  # the run's own EMA starts from them
    assert all(torch.equal(shadows[s], system.model.get_parameter(n)) for n, s in system.model_ema.m_name2s_name.items())
    text, reference_text = system.state_dict(), load_sd(base[1], base[0]).state_dict()
    text_keys = [k for k in reference_text if k.startswith("cond_stage_model.") and k not in FILLED_KEYS]
    assert text_keys and all(torch.equal(text[k], reference_text[k]) for k in text_keys)
    assert tensors_hash(system.first_stage_model.state_dict()) == tensors_hash(strip_prefix(state, VAE_PREFIX))
    assert float(system.scale_factor) == pytest.approx(SD_SCALE)
    assert all(p.requires_grad for p in system.model.parameters())
    assert not any(p.requires_grad for p in system.cond_stage_model.parameters())


def test_loading_the_base_is_strict(base, tmp_path):
    state = load_file(base[0])
    key = UNET_PREFIX + "out.2.weight"
    for name, broken in {"missing": {k: v for k, v in state.items() if k not in (key, ema_shadow_key(key))},
                         "extra": {**state, UNET_PREFIX + "not_a_layer.weight": torch.zeros(1)}}.items():
        bad = tmp_path / f"{name}.safetensors"
        save_file(broken, str(bad))
        cfg = load_config(CFG, overrides(base) + [f"model.params.base_ckpt={bad}", f"cache.vae={bad}"])
        complete_from_base(cfg)
        with pytest.raises(CheckpointError, match="not_a_layer" if name == "extra" else "out.2.weight"):
            start_from_base(build_system(cfg["model"]), cfg)


def test_the_cache_is_encoded_by_the_base_s_vae_and_refuses_another(base, tmp_path):
    cfg = completed(base, f"cache.dir={tmp_path / 'cache'}")
    meta = ensure_cache(cfg)
    vae, info = load_autoencoder(base[0], base[1])
    assert meta["vae"]["checkpoint"] == str(base[0].resolve()) and meta["vae"]["hash"] == info["hash"]
    assert meta["vae"]["hash"] == tensors_hash(strip_prefix(load_file(base[0]), VAE_PREFIX))
    assert meta["count"] == 8 and meta["latent_shape"] == [4, 8, 8]
    other_ckpt, _ = write_sd_file(tmp_path, seed=4)  # another SD file: another VAE
    other = load_config(CFG, overrides(base, "cache") + [f"model.params.base_ckpt={other_ckpt}",
                                                          f"cache.dir={tmp_path / 'cache'}"])
    complete_from_base(other)
    with pytest.raises(CacheError, match=f"was made with VAE {base[0].resolve()}"):
        ensure_cache(other)
    with pytest.raises(ConfigError, match="cache.vae: a fine-tune's latents are encoded by its base's VAE"):
        complete_from_base(load_config(CFG, overrides(base) + ["cache.vae=runs/vae/latest"]))


@pytest.mark.parametrize("bad, message", [
    ("model.params.base_config=null", "model.params.base_config: required"),
    ("model.params.base_ckpt=nowhere.safetensors", "model.params.base_ckpt: nowhere.safetensors not found"),
])
def test_a_bad_base_is_one_clear_error(base, bad, message):
    with pytest.raises((ConfigError, CheckpointError), match=message):
        completed(base, bad)


@pytest.mark.parametrize("name, parameterization, size, context", [
    ("finetune-v1", "eps", 512, 768), ("finetune-v2-v", "v", 768, 1024)])
def test_the_shipped_configs_fine_tune_the_public_architectures(name, parameterization, size, context, tmp_path):
    stand_in = tmp_path / "base.safetensors"  # completing reads the config, never the weights
    stand_in.touch()
    cfg = load_config(REPO_ROOT / "configs" / "sd" / f"{name}.yaml", [f"model.params.base_ckpt={stand_in}"])
    complete_from_base(cfg)
    with params_on_meta():
        system = instantiate_from_config(cfg["model"], "model")
    unet = {k: list(v.shape) for k, v in system.state_dict().items() if k.startswith(UNET_PREFIX)}
    assert unet == reference("sd15_unet.json" if context == 768 else "sd21_unet.json")["shapes"]
    assert (system.parameterization, int(system.image_size), float(system.scale_factor)) == (parameterization, size,
                                                                                            pytest.approx(SD_SCALE))
    assert system.cond_stage_model.context_dim == context and system.cond_stage_model.frozen
    assert cfg["model"]["params"]["unet"]["params"]["use_checkpoint"] and system.model_ema is not None


@pytest.mark.slow
def test_a_full_fine_tune_trains_exports_and_loads_back(base, tmp_path, capsys):
    run = train("ldm", argv=["--cfg", str(CFG), "--runs-dir", str(tmp_path / "runs"),
                             *overrides(base, "e2e-cache")])
    final = state_dict_of(load_file(run / "checkpoints" / "last.ckpt"))
    start = public_state(tiny_system("v1-inference", 3))
    assert float(final["scale_factor"]) == pytest.approx(SD_SCALE)  # the base's, not the cache's 1 / std
    assert read_meta(base[3] / "e2e-cache")["scale_factor"] != pytest.approx(SD_SCALE)
    text_key = "cond_stage_model.model.token_embedding.weight"
    assert torch.equal(final[text_key], load_sd(base[1], base[0]).state_dict()[text_key])  # frozen text encoder
    changed = [k for k in ema_unet_state(start) if not torch.equal(final[UNET_PREFIX + k], ema_unet_state(start)[k])]
    assert changed  # the U-Net trained
    out = tmp_path / "finetuned.safetensors"
    assert export_main([str(run), "--out", str(out), "--ema-only"]) == 0
    expected = np.stack([np.asarray(im) for im in Pipeline.from_run(run, device="cpu")(PROMPTS, **DRAW)])
    reloaded = np.stack([np.asarray(im) for im in Pipeline.from_checkpoint(out, device="cpu")(PROMPTS, **DRAW)])
    assert np.array_equal(expected, reloaded)
    txt2img = load_script("txt2img")
    code = txt2img.main(["--ckpt", str(out), "--prompt", PROMPTS[0], "--seed", "5", "--steps", "3", "--sampler",
                         "ddim", "--scale", "3", "--out", str(tmp_path / "png")])
    assert code == 0, capsys.readouterr().err
    assert len(list((tmp_path / "png").glob("*.png"))) == 1


def train_step(system, cfg) -> torch.Tensor:
    """One loss + backward on a batch of the cache (built when missing)."""
    return loss_step(system, cache_batch(cfg), seed=None)


def test_a_trainable_text_encoder_gets_gradients_with_the_u_net(base):
    cfg = completed(base, "model.params.cond_stage_trainable=true", f"cache.dir={base[3] / 'te-cache'}")
    system = build_system(cfg["model"])
    start_from_base(system, cfg)
    system.train()
    train_step(system, cfg)
    blocks = list(system.cond_stage_model.model.transformer.parameters())  # what the context is computed with
    assert blocks and all(p.requires_grad and p.grad is not None for p in blocks)
    assert {id(p) for p in system.trainable_parameters()} >= {id(p) for p in blocks}


def test_an_sd2_v_base_fine_tunes_with_v_prediction_and_its_schedule(tmp_path):
    ckpt, config = write_sd_file(tmp_path, "v2-inference-v", seed=2)
    cfg = load_config(CFG, [f"model.params.base_ckpt={ckpt}", f"model.params.base_config={config}",
                            f"cache.data.train.params.root={write_image_folder(tmp_path / 'images')}",
                            f"cache.dir={tmp_path / 'cache'}"])
    complete_from_base(cfg)
    system = build_system(cfg["model"])
    info = start_from_base(system, cfg)
    assert info["ema"] and info["text_encoder"] == "native"  # SD 2's open_clip names
    assert system.parameterization == "v" and system.cond_stage_model.layer == "penultimate"
    assert torch.isfinite(train_step(system.train(), cfg))
