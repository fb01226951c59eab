"""Cached text embeddings for a fine-tune of a public SD file (toy files of the public layout): the frozen encoder's
weights come from the base, the cache names the base's encoder and refuses another base, and the system trains
without building the encoder while its checkpoints and exports keep the base's encoder weights."""

import warnings

import pytest
import torch
from safetensors.torch import load_file as read_safetensors
from safetensors.torch import save_file

from ldm.core.config import ConfigError, load_config
from ldm.data.latents import CacheError, LatentDataset, read_meta
from ldm.data.text_cache import load_text_files
from ldm.inference.base_text import base_text_hash, base_text_state
from ldm.inference.sd import load_sd
from ldm.io.checkpoints import TEXT_PREFIX, load_file, state_dict_of, strip_prefix, tensors_hash
from ldm.nets.conditioning.cached import CachedTextEncoder
from ldm.training.cache import make_cache
from ldm.training.driver import train
from ldm.training.sd_finetune import complete_from_base, start_from_base
from ldm.training.text_cache import build_stage2_system, ensure_text_cache
from scripts.export import main as export_main
from tests.conftest import TINY
from tests.sd_toy import write_image_folder, write_sd_file

CFG = TINY / "sd-finetune.yaml"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(toy SD 1.x file, its inference config, a captioned image folder, a work folder)."""
    folder = tmp_path_factory.mktemp("text-base")
    ckpt, config = write_sd_file(folder, seed=3)
    return ckpt, config, write_image_folder(folder / "images"), folder


@pytest.fixture(scope="module")
def loaded(base):
    """The base as sampling loads it (only read)."""
    return load_sd(base[1], base[0])


@pytest.fixture(scope="module")
def cached(base):
    """(the completed config, the meta of its cache), the cache built once for the module."""
    cfg = completed(base)
    return cfg, make_cache(cfg, progress=False)


def overrides(base, cache: str, ckpt=None) -> list[str]:
    return [f"model.params.base_ckpt={ckpt or base[0]}", f"model.params.base_config={base[1]}",
            f"cache.data.train.params.root={base[2]}", f"cache.dir={base[3] / cache}", "cache.text_embeddings=true"]


def completed(base, cache: str = "cache", ckpt=None, *extra: str) -> dict:
    return complete_from_base(load_config(CFG, [*overrides(base, cache, ckpt), *extra]))


def text_weights(system) -> dict:
    return strip_prefix(system.state_dict(), TEXT_PREFIX)


def test_the_cache_holds_the_base_encoder_s_embeddings_and_names_its_weights(base, cached, loaded):
    cfg, meta = cached
    assert meta["text"]["hash"] == tensors_hash(text_weights(loaded))
    assert meta["text"]["base"] == str(base[0].resolve())
    data = LatentDataset(cfg["cache"]["dir"], "train")
    for i in (0, 5):
        item = data[i]
        assert torch.allclose(item["context"], loaded.cond_stage_model([item["caption"]])[0], atol=5e-3)  # fp16
    weights, uncond = load_text_files(cfg["cache"]["dir"])
    assert all(torch.equal(weights[k], v) for k, v in text_weights(loaded).items())
    assert torch.allclose(uncond["context"][0].float(), loaded.cond_stage_model([""])[0], atol=5e-3)


def test_a_cache_of_another_base_s_encoder_is_refused(base):
    cfg = completed(base, "other")
    make_cache(cfg, progress=False)
    other_ckpt = base[3] / "other-base.safetensors"  # same architecture, other weights
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in read_safetensors(str(base[0])).items()},
              str(other_ckpt))
    other = completed(base, "other", other_ckpt)
    with pytest.raises(CacheError, match=f"from the base {base[0].resolve()}.*not of this config's .* from the base "
                                         f"{other_ckpt.resolve()}"):
        ensure_text_cache(other, read_meta(base[3] / "other"))


def test_text_adapters_cannot_train_on_cached_embeddings(base):
    lora = completed(base, "cache", None, "model.params.lora={target: ldm.nets.lora.LoRA, params: "
                                          "{rank: 2, text_targets: [attn.out_proj]}}")
    with pytest.raises(ConfigError, match="text_targets"):
        ensure_text_cache(lora, {})


def test_the_system_trains_without_the_encoder_and_keeps_the_base_s_weights(cached, loaded):
    cfg, meta = cached
    ensure_text_cache(cfg, meta)
    system = build_stage2_system(cfg)
    assert isinstance(system.cond_stage_model, CachedTextEncoder) and not list(system.cond_stage_model.parameters())
    info = start_from_base(system, cfg)  # the base's U-Net and VAE load; its text weights meet the stand-in's
    assert info["ema"]
    state, want = system.state_dict(), loaded.state_dict()
    assert {k for k in state if not k.startswith("model_ema.")} == set(want)  # the public names, all of them
    assert all(torch.equal(state[k], want[k]) for k in want if k.startswith(TEXT_PREFIX))
    batch = torch.utils.data.default_collate([LatentDataset(cfg["cache"]["dir"], "train")[i] for i in range(4)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = system.train().training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and system.model.diffusion_model.out[2].weight.grad is not None


def test_base_text_state_is_what_loading_the_base_gives(base, loaded):
    state = base_text_state(base[0], base[1])
    want = text_weights(loaded)
    assert state.keys() == want.keys() and all(torch.equal(state[k].float(), want[k]) for k in want)
    assert base_text_hash(base[0], base[1]) == tensors_hash(want)  # the identity, computed without the encoder


@pytest.mark.slow
def test_a_fine_tune_on_cached_text_trains_resumes_and_exports_the_base_encoder(base, tmp_path):
    argv = ["--cfg", str(CFG), "--runs-dir", str(tmp_path / "runs"), *overrides(base, "e2e")]
    run = train("ldm", argv=argv)
    assert list((run / "samples").glob("*.png"))  # the grid built the real encoder for its prompts
    train("ldm", argv=["--resume", str(run), "trainer.max_steps=6"])
    final = state_dict_of(load_file(run / "checkpoints" / "last.ckpt"))
    want = text_weights(load_sd(base[1], base[0]))
    assert all(torch.equal(final[TEXT_PREFIX + k], v) for k, v in want.items())
    out = tmp_path / "finetuned.safetensors"
    assert export_main([str(run), "--out", str(out), "--ema-only"]) == 0
    exported = load_sd(None, out)  # strict: every key of the public layout
    assert all(torch.equal(text_weights(exported)[k], v) for k, v in want.items())


@pytest.mark.slow
def test_a_lora_fine_tune_on_cached_text_resumes_from_its_base_and_adapters(base, tmp_path):
    lora = TINY / "sd-lora.yaml"
    run = train("ldm", argv=["--cfg", str(lora), "--runs-dir", str(tmp_path / "runs"), *overrides(base, "e2e-lora"),
                             "trainer.max_steps=2", "callbacks=[]"])
    train("ldm", argv=["--resume", str(run), "trainer.max_steps=4"])  # the base again, the stand-in keeping its text
    final = state_dict_of(load_file(run / "checkpoints" / "last.ckpt"))
    assert final and not any(k.startswith(TEXT_PREFIX) for k in final)  # adapters only: the base gives the rest
    assert any("lora_A" in k for k in final)
