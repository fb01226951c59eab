"""Cached text embeddings: the frozen encoder's contexts in the latent cache, refused for another encoder, and stage 2
trained, resumed and sampled without building the encoder for its steps."""

import pytest
import torch

from ldm.core.config import ConfigError, load_config
from ldm.data.latents import CacheError, LatentDataset, read_meta
from ldm.data.text_cache import load_text_files
from ldm.inference.loaders import describe_run
from ldm.inference.sd_base import load_run_system
from ldm.nets.conditioning.cached import CachedTextEncoder
from ldm.training.cache import ensure_cache, make_cache
from ldm.training.driver import train
from ldm.training.text_cache import build_stage2_system, build_text_encoder, ensure_text_cache
from tests.conftest import TINY

FROZEN = ["cache.text_embeddings=true", "model.params.cond_stage_trainable=false"]


def text_config(vae_run, cache_dir, *extra):
    return load_config(TINY / "ldm-text.yaml", [f"cache.vae={vae_run}", f"cache.dir={cache_dir}", *FROZEN, *extra])


def test_cache_holds_each_captions_embedding_and_resumes(toy_vae_run, tmp_path):
    cfg = text_config(toy_vae_run, tmp_path / "c")
    meta = make_cache(cfg, progress=False)
    assert meta["text"]["complete"] and meta["text"]["context_shape"] == [16, 32]
    encoder, info = build_text_encoder(cfg)
    assert meta["text"]["hash"] == info["hash"]
    data = LatentDataset(str(tmp_path / "c"), "train")
    for i in (0, 30, 47):
        item = data[i]
        assert item["context"].shape == (16, 32)
        assert torch.allclose(item["context"], encoder([item["caption"]])[0], atol=5e-3)  # fp16 storage
    weights, uncond = load_text_files(tmp_path / "c")
    assert torch.allclose(uncond["context"][0].float(), encoder([""])[0], atol=5e-3)
    assert weights.keys() == encoder.state_dict().keys()

    # an interrupted text pass resumes: only the missing text shard is encoded again
    first = tmp_path / "c" / "train" / "text-00000.safetensors"
    second = tmp_path / "c" / "train" / "text-00001.safetensors"
    stamp = first.stat().st_mtime_ns
    second.unlink()
    meta["text"]["complete"] = False
    again = ensure_text_cache(cfg, meta)
    assert second.is_file() and first.stat().st_mtime_ns == stamp and again["text"]["encoded"]["train"] == 24


def test_text_cache_of_another_encoder_or_a_trainable_one_is_refused(toy_vae_run, tmp_path):
    make_cache(text_config(toy_vae_run, tmp_path / "c"), progress=False)
    other = text_config(toy_vae_run, tmp_path / "c", "seed=1")  # other random weights: another encoder
    with pytest.raises(CacheError, match="holds text embeddings of encoder .*hash"):
        ensure_text_cache(other, read_meta(tmp_path / "c"))
    trainable = text_config(toy_vae_run, tmp_path / "c", "model.params.cond_stage_trainable=true")
    with pytest.raises(ConfigError, match="cond_stage_trainable: false"):
        ensure_text_cache(trainable, read_meta(tmp_path / "c"))


def test_system_takes_cached_context_and_drops_to_the_cached_unconditional(toy_vae_run, tmp_path):
    cfg = text_config(toy_vae_run, tmp_path / "c", "model.params.ucg_rate=1.0")
    ensure_text_cache(cfg, ensure_cache(cfg))
    system = build_stage2_system(cfg)
    assert isinstance(system.cond_stage_model, CachedTextEncoder)
    assert not list(system.cond_stage_model.parameters())  # the encoder is not built
    batch = torch.utils.data.default_collate([LatentDataset(str(tmp_path / "c"), "train")[i] for i in range(4)])
    assert torch.equal(system.conditioning(batch, drop=False)["context"], batch["context"])
    dropped = system.conditioning(batch, drop=True)["context"]  # ucg_rate 1: every item unconditional
    assert torch.equal(dropped, system.cond_stage_model.unconditional(4))
    # the checkpoint keys are the real encoder's: a state dict round-trips through the stand-in
    state = system.state_dict()
    encoder, _ = build_text_encoder(cfg)
    assert all(torch.equal(state[f"cond_stage_model.{k}"], v) for k, v in encoder.state_dict().items())
    system.load_state_dict(state)


@pytest.mark.slow
def test_stage2_trains_resumes_and_samples_on_cached_text(toy_vae_run, tmp_path):
    cfg = str(TINY / "ldm-text.yaml")
    overrides = [f"cache.vae={toy_vae_run}", f"cache.dir={tmp_path / 'c'}", *FROZEN]
    run = train("ldm", cfg, ["--cfg", cfg, "--runs-dir", str(tmp_path / "runs"), *overrides, "trainer.max_steps=4"])
    assert list((run / "samples").glob("ldm-step*.png"))  # the grid built the real encoder for its prompts
    train("ldm", cfg, ["--resume", str(run), "trainer.max_steps=6"])
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    system, _ = load_run_system(describe_run(run))  # sampling builds the real encoder from the run's config
    weights, _ = load_text_files(tmp_path / "c")
    assert all(torch.equal(system.cond_stage_model.state_dict()[k], v) for k, v in weights.items())
