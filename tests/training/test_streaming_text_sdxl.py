"""Cached text embeddings of an SDXL base (a toy file in the public layout) in a litdata latent cache: each streamed
item carries both towers' context and the pooled embedding, grouped under ``text`` as the folder cache gives them, and
the SDXL stand-in makes the U-Net's inputs from them as the base's conditioner does from the captions."""

import pytest
import torch

from ldm.core.config import load_config
from ldm.data.latents import LatentDataset
from ldm.data.streaming import StreamingLatents
from ldm.data.text_cache import load_text_files
from ldm.inference.sd import load_sd
from ldm.nets.conditioning.cached_sdxl import CachedSDXLConditioner
from ldm.nets.conditioning.sdxl import SizeConditioning
from ldm.training.cache import make_cache
from ldm.training.sd_finetune import complete_from_base, start_from_base
from ldm.training.text_cache import build_stage2_system
from tests.conftest import TINY
from tests.sd_toy import write_image_folder
from tests.sdxl_toy import PIXELS, write_xl_file

pytestmark = pytest.mark.slow  # litdata's optimize starts worker processes

FP16 = dict(rtol=2e-3, atol=2e-3)  # the cache stores fp16
STREAMED = ["cache.format=litdata", "cache.chunk_bytes=16KB", "cache.num_workers=1"]


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """(the litdata config over a toy SDXL file with cached text, its cache folder, the folder cache of the same
    images, the base loaded as sampling loads it)."""
    folder = tmp_path_factory.mktemp("streamed-text-xl")
    ckpt, config = write_xl_file(folder, seed=3)
    images = write_image_folder(folder / "images", size=PIXELS)

    def completed(cache: str, *extra: str) -> dict:
        return complete_from_base(load_config(TINY / "sd-finetune.yaml", [
            f"model.params.base_ckpt={ckpt}", f"model.params.base_config={config}",
            f"cache.data.train.params.root={images}", f"cache.dir={folder / cache}", "cache.text_embeddings=true",
            *extra]))

    cfg = completed("litdata", *STREAMED)
    make_cache(cfg, progress=False)
    make_cache(completed("folder"), progress=False)
    return cfg, folder / "litdata", folder / "folder", load_sd(config, ckpt)


def test_streamed_items_group_context_and_pooled_as_the_folder_cache(xl):
    cfg, streamed_dir, folder_dir, base = xl
    folder = LatentDataset(str(folder_dir), "train")
    items = {item["index"]: item for item in StreamingLatents(str(streamed_dir), "train", shuffle=False)}
    assert sorted(items) == list(range(len(folder)))
    for i, item in items.items():
        reference = folder[i]
        assert "context" not in item and item["text"].keys() == {"context", "pooled"}
        assert all(torch.equal(item["text"][k], reference["text"][k]) for k in ("context", "pooled")), i
    text = base.cond_stage_model.text_outputs([items[i]["caption"] for i in range(3)])
    assert all(torch.allclose(items[i]["text"][k], text[k][i], **FP16) for i in range(3) for k in text)
    meta = StreamingLatents(str(streamed_dir), "train").meta
    assert meta["text"]["pooled_shape"] == folder.meta["text"]["pooled_shape"]
    assert meta["text"]["hash"] == folder.meta["text"]["hash"] and meta["text"]["base"] == folder.meta["text"]["base"]
    (_, uncond), (_, folder_uncond) = load_text_files(streamed_dir), load_text_files(folder_dir)
    assert all(torch.equal(uncond[k], folder_uncond[k]) for k in ("context", "pooled"))


def test_the_sdxl_stand_in_trains_on_streamed_outputs(xl):
    cfg, streamed_dir, _, base = xl
    system = build_stage2_system(cfg)
    stand_in = system.cond_stage_model
    assert isinstance(stand_in, CachedSDXLConditioner) and not list(stand_in.parameters())
    start_from_base(system, cfg)
    batch = next(iter(torch.utils.data.DataLoader(StreamingLatents(str(streamed_dir), "train"), batch_size=4)))
    sizes = SizeConditioning.for_size(PIXELS, PIXELS).batch(4)
    cond = stand_in.conditioning(batch[stand_in.key], sizes)
    real = base.cond_stage_model.conditioning(batch["caption"], sizes)
    assert all(torch.allclose(cond[k], real[k], **FP16) for k in real)
    loss = system.train().objective(system.network(), system.latents(batch), cond)
    loss.backward()
    assert torch.isfinite(loss) and system.model.diffusion_model.label_emb[0][0].weight.grad.abs().sum() > 0
    assert not stand_in._encoder  # the conditioner was never built
