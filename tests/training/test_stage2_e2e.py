"""Stage 2 at toy size: VAE run → latent cache (quick, on a toy VAE run written from memory) → train_ldm → resume
(slow tier: the training end to end); stale caches refused."""

import json

import pytest
import torch

from ldm.core.config import load_config
from ldm.data.latents import CacheError, LatentDataset, read_meta
from ldm.training.cache import ensure_cache, make_cache
from ldm.training.driver import train
from tests.components import write_vae_run
from tests.conftest import TINY


@pytest.mark.slow
def test_text_run_trains_resumes_and_samples(tiny_ldm_run, workdir):
    ckpt = torch.load(tiny_ldm_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.") for k in keys)
    assert any(k.startswith("cond_stage_model.") for k in keys)
    assert any(k.startswith("model_ema.") for k in keys)
    assert torch.isfinite(ckpt["state_dict"]["scale_factor"])
    assert list((tiny_ldm_run / "samples").glob("ldm-step*.png"))

    cfg = str(tiny_ldm_run / "config.yaml")
    train("ldm", cfg, ["--resume", str(tiny_ldm_run), "trainer.max_steps=8"], before_build=ensure_cache)
    assert torch.load(tiny_ldm_run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8


@pytest.mark.slow
def test_class_run_trains(tiny_class_run):
    ckpt = torch.load(tiny_class_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert ckpt["state_dict"]["cond_stage_model.embedding.weight"].shape == (169, 32)  # 168 classes + the null class


def test_cache_contents_scale_factor_and_resume(toy_vae_run, tmp_path):
    cfg = load_config(TINY / "ldm-text.yaml", [f"cache.vae={toy_vae_run}", f"cache.dir={tmp_path / 'c'}"])
    meta = make_cache(cfg, progress=False)
    assert meta["complete"] and meta["count"] == 48 + 8 and meta["latent_shape"] == [4, 8, 8]
    data = LatentDataset(str(tmp_path / "c"), "train")
    item = data[30]
    assert item["mean"].shape == item["std"].shape == (4, 8, 8) and item["std"].min() > 0
    assert isinstance(item["caption"], str) and isinstance(item["label"], int)
    # scale_factor = 1 / std of z = mean + std·ε over the whole split (checked by sampling)
    means = torch.stack([data[i]["mean"] for i in range(len(data))])
    stds = torch.stack([data[i]["std"] for i in range(len(data))])
    z = means + stds * torch.randn(64, *means.shape)
    assert meta["scale_factor"] == pytest.approx(1 / z.std().item(), rel=0.02)

    # an interrupted run resumes from finished shards: drop the last shard and rebuild only it
    shard = tmp_path / "c" / "train" / "shard-00001.safetensors"
    first = (tmp_path / "c" / "train" / "shard-00000.safetensors").stat().st_mtime_ns
    shard.unlink()
    (tmp_path / "c" / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(CacheError, match="unfinished"):
        read_meta(tmp_path / "c")
    again = make_cache(cfg, progress=False)
    assert shard.is_file() and (tmp_path / "c" / "train" / "shard-00000.safetensors").stat().st_mtime_ns == first
    assert again["scale_factor"] == pytest.approx(meta["scale_factor"], rel=1e-3)


def test_cache_of_another_vae_is_refused(toy_vae_run, workdir, tmp_path):
    cfg = load_config(TINY / "ldm-text.yaml", [f"cache.vae={toy_vae_run}", f"cache.dir={tmp_path / 'c'}"])
    make_cache(cfg, progress=False)
    other = write_vae_run(tmp_path / "runs", seed=1)  # another VAE: other weights, the same architecture
    stale = load_config(TINY / "ldm-text.yaml", [f"cache.vae={other}", f"cache.dir={tmp_path / 'c'}"])
    with pytest.raises(CacheError, match="was made with VAE .*but this config uses"):
        ensure_cache(stale)
    with pytest.raises(CacheError, match="holds latents of VAE"):
        make_cache(stale, progress=False)
