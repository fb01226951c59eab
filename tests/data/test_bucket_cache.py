"""A bucketed latent cache of a mixed-aspect folder: one latent shape per shard, meta.json's buckets and counts, the
micro-conditioning values carried from the folder, the step filled in or refused, stage 2 training on bucket batches
and its sample grid showing several aspect ratios."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from ldm.core.config import ConfigError, load_config
from ldm.data.folder import ImageFolderDataset
from ldm.data.latents import LatentDataset
from ldm.data.module import DataModule
from ldm.io.runs import SAMPLES_DIR
from ldm.training.cache import ensure_cache
from ldm.training.controlnet_base import prepare_controlnet
from ldm.training.driver import train
from tests.aspect_folder import make_aspect_folder
from tests.conftest import TINY
from tests.scripts import load_script

CONFIG = TINY / "ldm-buckets.yaml"
BUCKETS = [[12, 20], [16, 16], [20, 12]]  # resolution 16, step 4 (VAE f = 2 × U-Net 2)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return make_aspect_folder(tmp_path_factory.mktemp("mixed") / "mixed", 30)


def bucket_overrides(vae_run, folder, cache_dir) -> list[str]:
    """Overrides pointing the tiny bucket config at a folder, a VAE run and a cache folder."""
    return [f"cache.vae={vae_run}", f"cache.dir={cache_dir}", f"cache.data.train.params.root={folder}",
            f"cache.data.val.params.root={folder}"]


@pytest.fixture(scope="module")
def bucket_cache(toy_vae_run, mixed):
    args = bucket_overrides(toy_vae_run, mixed, mixed.parent / "cache")  # beside the data the fixture made
    meta = ensure_cache(load_config(CONFIG, args))
    return mixed.parent / "cache", meta, args


def test_shards_hold_one_shape_and_meta_counts_the_buckets(bucket_cache, mixed):
    cache, meta, _ = bucket_cache
    assert meta["buckets"]["config"] == {"resolution": 16, "step": 4, "max_aspect": 2.0, "crop": "center",
                                         "too_small": "upscale"}
    assert meta["buckets"]["sizes"] == BUCKETS and meta["image_size"] == [16, 16] and meta["latent_shape"] == [4, 8, 8]
    assert meta["data"]["train"]["params"]["buckets"]["step"] == 4  # step: null filled in, and kept as built from
    for split in ("train", "val"):
        folder = ImageFolderDataset(str(mixed), captions="metadata", split=split, buckets=meta["buckets"]["config"])
        counts = {f"{h}x{w}": 0 for h, w in BUCKETS}
        for b in folder.bucket_ids:
            counts["x".join(map(str, BUCKETS[b]))] += 1
        assert meta["buckets"]["counts"][split] == counts
        for shard in sorted((cache / split).glob("shard-*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                h, w = f.get_slice("mean").get_shape()[2:]
            assert [h * 2, w * 2] in BUCKETS  # the latents of one bucket (f = 2)


def test_items_carry_original_size_and_crop_of_the_folder(bucket_cache, mixed):
    cache, meta, _ = bucket_cache
    latents = LatentDataset(str(cache), "train")
    folder = ImageFolderDataset(str(mixed), captions="metadata", split="train", buckets=meta["buckets"]["config"])
    by_path = {folder.records[i].rel: folder[i] for i in range(len(folder))}
    assert len(latents) == len(folder) and len(set(latents.bucket_ids)) == 3
    for i in range(len(latents)):
        item = latents[i]
        source = by_path[item["path"]]
        with Image.open(mixed / item["path"]) as image:
            assert item["original_size"].tolist() == [image.height, image.width]
        assert item["crop_top_left"].tolist() == source["crop_top_left"].tolist()
        assert [2 * s for s in item["mean"].shape[1:]] == list(source["image"].shape[1:])
    wide = next(latents[i] for i in range(len(latents)) if latents[i]["original_size"].tolist() == [20, 40])
    assert wide["crop_top_left"].tolist() == [0, 2]  # 40×20 → cover 24×12 → centre crop 20×12 starts 2 px in


def test_batches_hold_one_bucket(bucket_cache):
    cache, _, _ = bucket_cache
    dm = DataModule(LatentDataset(str(cache), "train"), LatentDataset(str(cache), "val"), batch_size=4,
                    drop_last=False)
    seen = []
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for batch in loader:
            assert batch["mean"].ndim == 4 and len(batch["original_size"]) == len(batch["mean"])
            seen += batch["path"]
    assert len(seen) == len(dm.train_dataset) + len(dm.val_dataset) == 30


def test_a_step_off_the_model_grid_is_refused(toy_vae_run, mixed, tmp_path):
    args = bucket_overrides(toy_vae_run, mixed, tmp_path / "cache")
    with pytest.raises(ConfigError, match="buckets.step: 6 is not a multiple of 4 .*factor 2 .*downsampling 2"):
        ensure_cache(load_config(CONFIG, args + ["cache.data.train.params.buckets.step=6"]))
    with pytest.raises(ConfigError, match="resolution 2 gives no bucket .* step 4"):
        ensure_cache(load_config(CONFIG, args + ["cache.data.train.params.buckets.resolution=2"]))


@pytest.fixture(scope="module")
def bucket_run(bucket_cache, workdir):
    """A 4-step stage-2 run of the tiny bucket config."""
    _, _, args = bucket_cache
    return train("ldm", str(CONFIG), ["--cfg", str(CONFIG), "--runs-dir", str(workdir / "runs"), "--name",
                                      "buckets", *args, "trainer.max_steps=4"], before_build=ensure_cache)


@pytest.mark.slow
def test_stage2_trains_on_buckets_and_draws_each_aspect(bucket_run, workdir):
    run = bucket_run
    grid = run / SAMPLES_DIR / "ldm-step0000004.png"
    legend = grid.with_suffix(".txt").read_text()
    assert "rows (width×height): 20×12, 16×16, 12×20" in legend
    with Image.open(grid) as image:  # three rows of the tallest bucket's height, two columns of the widest
        assert image.size == (2 * 20 + 3 * 2, 3 * 20 + 4 * 2)
    assert "step: 4" in (run / "config.yaml").read_text()  # the run keeps the step it was built with
    out = workdir / "bucket-samples"  # txt2img at a bucket's size: drawn at that size, nothing stretched
    assert load_script("txt2img").main(["--run", str(run), "--prompt", "a red block", "--W", "20", "--H", "12",
                                        "--steps", "2", "--no-grid", "--out", str(out)]) == 0
    (image,) = out.glob("*.png")
    assert Image.open(image).size == (20, 12)


@pytest.mark.slow
def test_controlnet_trains_on_bucketed_hints(bucket_run, toy_vae_run, mixed, workdir):
    """Stage 3 on a bucketed folder (--data, Canny hints of each bucket crop): hints and latents of the same bucket
    in every cached item, grids drawn at the batch's bucket size."""
    cfg = TINY / "controlnet.yaml"
    run = train("controlnet", str(cfg), ["--cfg", str(cfg), "--runs-dir", str(workdir / "runs"), "--data", str(mixed),
                                         "data.buckets.resolution=16", f"model.params.base={bucket_run}",
                                         f"cache.vae={toy_vae_run}", f"cache.dir={mixed.parent / 'canny-cache'}"],
                before_build=prepare_controlnet)
    cache = load_config(run / "config.yaml")["cache"]
    assert cache["data"]["train"]["params"]["buckets"] == {"resolution": 16, "step": 4}  # from the base's U-Net
    latents = LatentDataset(cache["dir"], "train")
    assert len(set(latents.bucket_ids)) == 3
    for i in range(len(latents)):
        item = latents[i]
        assert list(item["hint"].shape[1:]) == [2 * s for s in item["mean"].shape[1:]]  # the bucket's pixels
    assert list((run / SAMPLES_DIR).glob("controlnet-*.png"))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.slow
def test_vae_trains_on_buckets_with_its_own_factor(mixed, workdir):
    """Stage 1 on a bucketed folder: the step is the VAE's factor, batches one bucket each, the grid drawn."""
    cfg = TINY / "vae.yaml"
    run = train("vae", str(cfg), ["--cfg", str(cfg), "--runs-dir", str(workdir / "runs"), "--data", str(mixed),
                                  "data.buckets.resolution=16", "trainer.max_steps=3", "--name", "vae-buckets"])
    params = load_config(run / "config.yaml")["data"]["params"]["train"]["params"]
    assert params["buckets"] == {"resolution": 16, "step": 2}  # f = 2: buckets 20×12 … 12×20 (and more)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
