"""Cached text embeddings of an SDXL base (a toy file in the public layout): the cache holds each caption's context
and pooled embedding from both towers as loading the base gives them, and the stage-2 system trains on them through
the cached stand-in, with the base's conditioner weights under their public names."""

from collections import Counter

import pytest
import torch
from safetensors.torch import load_file as load_safetensors

from ldm.core.config import load_config
from ldm.data.latents import LatentDataset
from ldm.data.text_cache import load_text_files
from ldm.inference.sd import load_sd
from ldm.io.checkpoints import EMA_PREFIX, TEXT_PREFIX, load_file, state_dict_of
from ldm.nets.conditioning.cached_sdxl import CachedSDXLConditioner
from ldm.nets.conditioning.sdxl import SizeConditioning
from ldm.nets.lora import is_lora_key
from ldm.systems.latent_diffusion import SCALE_BUFFERS
from ldm.training.cache import make_cache
from ldm.training.driver import train
from ldm.training.sd_finetune import complete_from_base, start_from_base
from ldm.training.text_cache import build_stage2_system
from scripts.export import main as export_main
from tests.aspect_folder import make_aspect_folder
from tests.conftest import TINY
from tests.sd_toy import write_image_folder
from tests.sdxl_toy import PIXELS, write_xl_file

FP16 = dict(rtol=2e-3, atol=2e-3)  # the cache stores fp16


@pytest.fixture(scope="module")
def xl_base(tmp_path_factory):
    """(a toy SDXL file, its inference config, the base loaded as sampling loads it), written and loaded once for the
    module's fine-tunes (the tests only read the loaded base)."""
    ckpt, config = write_xl_file(tmp_path_factory.mktemp("xl-base"), seed=3)
    return ckpt, config, load_sd(config, ckpt)


@pytest.fixture(scope="module")
def xl(tmp_path_factory, xl_base):
    """(a completed fine-tune config over a toy SDXL file with cached text, the base loaded as sampling loads it)."""
    folder = tmp_path_factory.mktemp("text-xl")
    ckpt, config, base = xl_base
    images = write_image_folder(folder / "images", size=PIXELS)
    cfg = load_config(TINY / "sd-finetune.yaml", [  # the SD 1.x recipe over an SDXL base: the model is the base's
        f"model.params.base_ckpt={ckpt}", f"model.params.base_config={config}",
        f"cache.data.train.params.root={images}", f"cache.dir={folder / 'cache'}", "cache.text_embeddings=true"])
    complete_from_base(cfg)
    make_cache(cfg, progress=False)
    return cfg, base


def test_the_cache_holds_both_towers_context_and_the_pooled_embedding(xl):
    cfg, base = xl
    data = LatentDataset(cfg["cache"]["dir"], "train")
    text = base.cond_stage_model.text_outputs([data[i]["caption"] for i in range(3)])
    for i in range(3):
        item = data[i]
        assert "context" not in item and item["text"].keys() == {"context", "pooled"}
        for key in ("context", "pooled"):
            assert torch.allclose(item["text"][key], text[key][i], **FP16), key
    assert data.meta["text"]["pooled_shape"] == [base.cond_stage_model.embedders[-1].model.text_projection.shape[-1]]
    _, uncond = load_text_files(cfg["cache"]["dir"])
    empty = base.cond_stage_model.text_outputs([""])
    assert all(torch.allclose(uncond[k].float(), empty[k], **FP16) for k in ("context", "pooled"))


def test_stage2_trains_on_the_cached_outputs_with_the_base_s_weights(xl):
    cfg, base = xl
    system = build_stage2_system(cfg)
    stand_in = system.cond_stage_model
    assert isinstance(stand_in, CachedSDXLConditioner) and not list(stand_in.parameters())
    start_from_base(system, cfg)
    state, want = system.state_dict(), base.state_dict()
    assert all(torch.equal(state[k], want[k]) for k in want if k.startswith(TEXT_PREFIX))
    data = LatentDataset(cfg["cache"]["dir"], "train")
    batch = torch.utils.data.default_collate([data[i] for i in range(4)])
    sizes = SizeConditioning.for_size(PIXELS, PIXELS).batch(4)
    cond = stand_in.conditioning(batch[stand_in.key], sizes)
    real = base.cond_stage_model.conditioning(batch["caption"], sizes)
    assert all(torch.allclose(cond[k], real[k], **FP16) for k in real)
    loss = system.train().objective(system.network(), system.latents(batch), cond)
    loss.backward()
    assert torch.isfinite(loss) and system.model.diffusion_model.label_emb[0][0].weight.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="conditioning"):  # the batch's outputs need their sizes
        stand_in(batch[stand_in.key])


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory, xl_base):
    """The toy SDXL fine-tune recipe (mixed-aspect buckets) over a toy SDXL file, on cached text, cache built."""
    folder = tmp_path_factory.mktemp("text-xl-buckets")
    ckpt, config, base = xl_base
    cfg = load_config(TINY / "sdxl-finetune.yaml", [
        f"model.params.base_ckpt={ckpt}", f"model.params.base_config={config}", "cache.text_embeddings=true",
        f"cache.data.train.params.root={make_aspect_folder(folder / 'mixed', n=8)}", f"cache.dir={folder / 'cache'}"])
    complete_from_base(cfg)
    make_cache(cfg, progress=False)
    return cfg, base, folder


def test_a_bucketed_sdxl_fine_tune_on_cached_text_conditions_as_the_real_conditioner(bucketed):
    cfg, base, _ = bucketed
    system = build_stage2_system(cfg)
    start_from_base(system, cfg)
    data = LatentDataset(cfg["cache"]["dir"], "train")
    largest = Counter(data.bucket_ids).most_common(1)[0][0]
    rows = [i for i in range(len(data)) if data.bucket_ids[i] == largest][:4]
    assert len(rows) > 2  # a batch of more rows than the cached text has fields
    batch = torch.utils.data.default_collate([data[i] for i in rows])
    h, w = batch["mean"].shape[-2:]
    sizes = {"original_size": batch["original_size"].float(), "crop_top_left": batch["crop_top_left"].float(),
             "target_size": torch.tensor([[h * 2, w * 2]] * len(rows), dtype=torch.float32)}  # the toy VAE's f = 2
    with torch.no_grad():
        got = system.conditioning(batch, drop=False)  # LatentDiffusion's sized branch over the cached stand-in
        real = base.cond_stage_model.conditioning(batch["caption"], sizes)
    assert all(torch.allclose(got[k], real[k], **FP16) for k in real)
    system.ucg_rate = 1.0
    with torch.no_grad():
        dropped = system.conditioning(batch, drop=True)
    pooled = base.cond_stage_model.embedders[-1].model.text_projection.shape[-1]
    assert not dropped["context"].any() and not dropped["y"][:, :pooled].any()  # text zeroed (zero_unconditional)
    assert torch.equal(dropped["y"][:, pooled:], got["y"][:, pooled:])  # the batch's sizes kept


@pytest.mark.slow
def test_an_sdxl_lora_run_on_cached_text_trains_without_the_text_towers_and_exports(bucketed, tmp_path):
    cfg, base, folder = bucketed
    argv = ["--cfg", str(TINY / "sdxl-lora.yaml"), "--runs-dir", str(tmp_path / "runs"),
            f"model.params.base_ckpt={cfg['model']['params']['base_ckpt']}", "cache.text_embeddings=true",
            f"model.params.base_config={cfg['model']['params']['base_config']}",
            f"cache.data.train.params.root={folder / 'mixed'}", f"cache.dir={cfg['cache']['dir']}"]
    run = train("ldm", argv=argv)
    adapters = state_dict_of(load_file(run / "checkpoints" / "last.ckpt"))
    assert adapters and all(is_lora_key(k) or k.startswith(EMA_PREFIX) or k in SCALE_BUFFERS for k in adapters)
    out = tmp_path / "lora.safetensors"
    assert export_main([str(run), "--out", str(out)]) == 0
    assert any(k.startswith("lora_unet_") for k in load_safetensors(str(out)))
