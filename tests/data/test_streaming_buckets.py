"""A bucketed cache as litdata shards (local mode): every streamed item is the folder cache's item at the same index
(latent shape, path, original size and crop), meta.json lists the same buckets, and the DataModule draws the same
bucket-homogeneous batches from it as from the folder cache, resumed mid-epoch included; the plain streamed reader
refuses a bucketed cache instead of collating mixed shapes, and a bucketed cache without its runs is refused before
training."""

from __future__ import annotations

import json

import pytest
import torch

from ldm.core.config import load_config
from ldm.data.latents import CacheError, LatentDataset
from ldm.data.module import DataModule
from ldm.data.streaming import StreamingLatents
from ldm.data.streaming_buckets import StreamingBucketLatents
from ldm.training.cache import ensure_cache
from ldm.training.resolve import resolve_stage2
from tests.aspect_folder import make_aspect_folder
from tests.conftest import TINY

pytestmark = pytest.mark.slow  # litdata's optimize starts worker processes

CONFIG = TINY / "ldm-buckets.yaml"
STREAMED = ["cache.format=litdata", "cache.chunk_bytes=2KB", "cache.num_workers=1", "cache.shard_size=8"]


@pytest.fixture(scope="module")
def caches(tiny_vae_run, tmp_path_factory):
    """The same mixed-aspect folder cached as litdata shards and as a folder cache; the litdata config's overrides."""
    folder = make_aspect_folder(tmp_path_factory.mktemp("mixed") / "mixed", 30)
    common = [f"cache.vae={tiny_vae_run}", f"cache.data.train.params.root={folder}",
              f"cache.data.val.params.root={folder}", "cache.shard_size=8"]
    litdata, plain = folder.parent / "litdata", folder.parent / "folder"  # beside the data the fixture made
    streamed = [*common, f"cache.dir={litdata}", *STREAMED]
    ensure_cache(load_config(CONFIG, streamed))
    ensure_cache(load_config(CONFIG, [*common, f"cache.dir={plain}"]))
    return litdata, plain, streamed


def test_streamed_items_and_buckets_are_the_folder_caches(caches):
    streamed_dir, folder_dir, _ = caches
    for split in ("train", "val"):
        streamed, folder = StreamingBucketLatents(str(streamed_dir), split), LatentDataset(str(folder_dir), split)
        assert streamed.meta["buckets"] == folder.meta["buckets"]
        assert streamed.meta["latent_shape"] == folder.meta["latent_shape"] == [4, 8, 8]
        assert streamed.bucket_ids == folder.bucket_ids and len(streamed) == len(folder)
        shapes = {}
        for i, bucket in enumerate(streamed.bucket_ids):
            shapes.setdefault(bucket, set()).add(tuple(streamed[i]["mean"].shape))
        assert all(len(s) == 1 for s in shapes.values()) and len(shapes) == (3 if split == "train" else 2)
        for i in range(len(folder)):
            item, reference = streamed[i], folder[i]
            assert torch.equal(item["mean"], reference["mean"]) and torch.equal(item["std"], reference["std"])
            assert item["path"] == reference["path"]
            assert torch.equal(item["original_size"], reference["original_size"])
            assert torch.equal(item["crop_top_left"], reference["crop_top_left"])
    with pytest.raises(CacheError, match="StreamingBucketLatents"):
        StreamingLatents(str(streamed_dir), "train")


def paths_of(loader) -> list[list[str]]:
    return [list(batch["path"]) for batch in loader]


def test_the_datamodule_draws_the_folder_caches_batches_and_resumes(caches):
    streamed_dir, folder_dir, _ = caches
    data = {"s": StreamingBucketLatents(str(streamed_dir)), "f": LatentDataset(str(folder_dir))}
    modules = {k: DataModule(d, batch_size=3, drop_last=False, seed=7, val_fraction=0.0) for k, d in data.items()}
    epochs = {}
    for key, module in modules.items():
        loader = module.train_dataloader()
        epochs[key] = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            epochs[key].append(paths_of(loader))
    assert epochs["s"] == epochs["f"] and epochs["s"][0] != epochs["s"][1]  # reshuffled per epoch, one order
    shapes = [{tuple(data["s"][i]["mean"].shape) for i in batch} for batch in modules["s"].train_dataloader().sampler]
    assert all(len(s) == 1 for s in shapes)  # every batch one latent shape
    resumed = DataModule(StreamingBucketLatents(str(streamed_dir)), batch_size=3, drop_last=False, seed=7,
                         val_fraction=0.0)
    resumed.resume_at(len(epochs["s"][0]) + 2)  # epoch 1, two batches in
    assert paths_of(resumed.train_dataloader()) == epochs["s"][1][2:]
    workers = DataModule(StreamingBucketLatents(str(streamed_dir)), batch_size=3, drop_last=False, seed=7,
                         val_fraction=0.0, num_workers=2)  # each loader worker opens its own litdata reader
    assert paths_of(workers.train_dataloader()) == epochs["s"][0]


def test_stage2_reads_a_bucketed_litdata_cache_through_the_bucket_reader(caches):
    _, _, streamed = caches
    cfg = resolve_stage2(load_config(CONFIG, streamed), str(CONFIG)).config
    assert {cfg["data"]["params"][split]["target"] for split in ("train", "val")} == {
        "ldm.data.streaming_buckets.StreamingBucketLatents"}


def test_a_streamed_cache_without_bucket_runs_is_refused_before_training(caches, tmp_path):
    streamed_dir, _, streamed = caches
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads((streamed_dir / "meta.json").read_text())
    for counts in meta["splits"].values():
        del counts["bucket_runs"]  # as a bucketed litdata cache built before buckets streamed
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="without their bucket runs"):
        ensure_cache(load_config(CONFIG, [*streamed, f"cache.dir={old}", f"cache.uri={meta['uri']}"]))
    with pytest.raises(CacheError, match="records no buckets"):
        StreamingBucketLatents(str(old))
