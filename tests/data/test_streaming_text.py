"""Cached text embeddings in a litdata latent cache (local mode): every streamed item carries its caption's embedding as
the folder cache's text shards hold it, the encoder's files sit beside meta.json, a cache of another encoder (or one
built without embeddings) is refused, stage 2 trains on it without building the text encoder, and a bucketed one gives
bucket-homogeneous batches with their contexts."""

import json
import shutil

import lightning as L
import pytest
import torch
import yaml

from ldm.core.config import load_config
from ldm.data.latents import CacheError, LatentDataset, read_meta
from ldm.data.module import DataModule
from ldm.data.streaming import StreamingLatents, build_streaming_cache
from ldm.data.streaming_buckets import StreamingBucketLatents
from ldm.data.text_cache import load_text_files
from ldm.inference.loaders import load_autoencoder
from ldm.nets.conditioning.cached import CachedTextEncoder
from ldm.training.cache import ensure_cache, make_cache, prepare_stage2
from ldm.training.driver import train
from ldm.training.text_cache import build_stage2_system, build_text_encoder, ensure_text_cache
from tests.aspect_folder import make_aspect_folder
from tests.conftest import TINY

pytestmark = pytest.mark.slow  # litdata's optimize starts worker processes; stage-2 runs end to end

CONFIG = TINY / "ldm-text.yaml"
TEXT = ["cache.text_embeddings=true", "model.params.cond_stage_trainable=false"]
STREAMED = ["cache.format=litdata", "cache.chunk_bytes=8KB", "cache.num_workers=1"]


def config(vae_run, cache_dir, *extra):
    return load_config(CONFIG, [f"cache.vae={vae_run}", f"cache.dir={cache_dir}", *TEXT, *extra])


@pytest.fixture(scope="module")
def caches(toy_vae_run, tmp_path_factory):
    """The tiny shapes cached with text embeddings as litdata shards and as a folder cache; the litdata config."""
    tmp = tmp_path_factory.mktemp("streamed-text")
    cfg = config(toy_vae_run, tmp / "litdata", *STREAMED)
    make_cache(cfg, progress=False)
    make_cache(config(toy_vae_run, tmp / "folder"), progress=False)
    return cfg, tmp / "litdata", tmp / "folder"


def test_streamed_items_carry_the_folder_caches_text_embeddings(caches):
    cfg, streamed_dir, folder_dir = caches
    meta, folder_meta = read_meta(streamed_dir), read_meta(folder_dir)
    assert meta["text"]["complete"] and meta["text"]["encoded"] == {"train": 48, "val": 8}
    assert {k: v for k, v in meta["text"].items() if k != "encoded"} == \
        {k: v for k, v in folder_meta["text"].items() if k != "encoded"}  # the encoder's identity and shapes
    assert meta["text"]["hash"] == build_text_encoder(cfg)[1]["hash"]
    for split in ("train", "val"):
        folder = LatentDataset(str(folder_dir), split)
        items = {item["index"]: item for item in StreamingLatents(str(streamed_dir), split, shuffle=False)}
        assert sorted(items) == list(range(len(folder)))
        for i, item in items.items():
            reference = folder[i]
            assert item["caption"] == reference["caption"]
            assert item["context"].dtype == torch.float32 and item["context"].shape == (16, 32)
            assert torch.equal(item["context"], reference["context"]), (split, i)
    (weights, uncond), (folder_weights, folder_uncond) = load_text_files(streamed_dir), load_text_files(folder_dir)
    assert torch.equal(uncond["context"], folder_uncond["context"])
    assert all(torch.equal(weights[k], folder_weights[k]) for k in folder_weights)


def test_stage2_takes_the_streamed_context_without_the_encoder(caches):
    cfg, streamed_dir, _ = caches
    meta = prepare_stage2(cfg)  # the cache checked: VAE, shards, text encoder
    system = build_stage2_system(cfg)
    system.scale_factor.fill_(meta["scale_factor"])  # as training adopts it from the cache
    assert isinstance(system.cond_stage_model, CachedTextEncoder) and not list(system.cond_stage_model.parameters())
    loader = torch.utils.data.DataLoader(StreamingLatents(str(streamed_dir), "train"), batch_size=4)
    batch = next(iter(loader))
    assert batch["context"].shape == (4, 16, 32)
    assert torch.equal(system.conditioning(batch, drop=False)["context"], batch["context"])
    loss = system.train().objective(system.network(), system.latents(batch), system.conditioning(batch, drop=True))
    loss.backward()
    assert torch.isfinite(loss) and not system.cond_stage_model._encoder  # never built


def copy_cache(cache_dir, to, **meta_changes):
    """A copy of a litdata cache (shards included, meta.json pointed at them) with meta.json's entries changed."""
    shutil.copytree(cache_dir, to)
    meta = json.loads((to / "meta.json").read_text())
    meta.update(uri=str(to / "shards"), **meta_changes)
    (to / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))
    return meta


def test_another_encoder_or_a_cache_without_embeddings_is_refused(caches, toy_vae_run, tmp_path):
    cfg, streamed_dir, _ = caches
    other = config(toy_vae_run, streamed_dir, *STREAMED, "seed=1")  # other random weights: another encoder
    with pytest.raises(CacheError, match="holds text embeddings of encoder .*hash"):
        prepare_stage2(other)
    copy_cache(streamed_dir, tmp_path / "partial", complete=False, parts={"train": 1})  # a build to resume
    with pytest.raises(CacheError, match="holds text embeddings of encoder .*hash"):
        make_cache(config(toy_vae_run, tmp_path / "partial", *STREAMED, "seed=1"), progress=False)

    meta = copy_cache(streamed_dir, tmp_path / "plain", text=None)  # as built with cache.text_embeddings: false
    plain = config(toy_vae_run, tmp_path / "plain", *STREAMED)
    with pytest.raises(CacheError, match="without text embeddings"):
        ensure_cache(plain)
    copy_cache(streamed_dir, tmp_path / "plain-partial", text=None, complete=False, parts={"train": 1})
    with pytest.raises(CacheError, match="without text embeddings"):  # refused before any part is encoded
        make_cache(config(toy_vae_run, tmp_path / "plain-partial", *STREAMED), progress=False)
    assert json.loads((tmp_path / "plain-partial" / "meta.json").read_text())["parts"] == {"train": 1}
    without = load_config(CONFIG, [f"cache.vae={toy_vae_run}", f"cache.dir={streamed_dir}", *STREAMED])
    assert ensure_text_cache(without, ensure_cache(without))["splits"] == meta["splits"]  # asked for none: served


class Uncaptioned(torch.utils.data.Dataset):
    """Images without captions."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return {"image": torch.zeros(3, 16, 16)}


def test_data_without_captions_is_refused_before_encoding(toy_vae_run, tmp_path):
    cfg = config(toy_vae_run, tmp_path / "c", *STREAMED)
    vae, info = load_autoencoder(toy_vae_run)
    with pytest.raises(CacheError, match=r"cache.data.train \(Uncaptioned\) holds no captions"):
        build_streaming_cache(vae, {"train": Uncaptioned()}, tmp_path / "c", str(tmp_path / "shards"), info,
                              text=build_text_encoder(cfg))
    assert not (tmp_path / "shards").exists() and not (tmp_path / "c" / "meta.json").exists()


class Conditioning(L.Callback):
    """Records, per training step, the batch's context shape and whether the text encoder was ever built."""

    seen: dict[int, tuple] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        stand_in = pl_module.cond_stage_model
        Conditioning.seen[trainer.global_step] = (type(stand_in).__name__, tuple(batch["context"].shape),
                                                  bool(stand_in._encoder))


def test_stage2_trains_and_resumes_on_streamed_text_without_the_encoder(caches, toy_vae_run, tmp_path, monkeypatch):
    _, streamed_dir, _ = caches
    monkeypatch.setenv("LDM_ALLOW_TARGETS", "tests.")  # the recording callback above
    raw = yaml.safe_load(CONFIG.read_text())
    raw["callbacks"] = [{"target": f"{__name__}.Conditioning"}]
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    cfg = str(tmp_path / "cfg.yaml")
    common = [f"cache.vae={toy_vae_run}", f"cache.dir={streamed_dir}", *STREAMED, *TEXT]
    Conditioning.seen = {}
    run = train("ldm", cfg, ["--cfg", cfg, "--runs-dir", str(tmp_path / "runs"), *common, "trainer.max_steps=3"])
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["params"]["train"]["target"].endswith(
        "StreamingLatents")
    train("ldm", cfg, ["--resume", str(run), "trainer.max_steps=5"])
    assert Conditioning.seen == {step: ("CachedTextEncoder", (8, 16, 32), False) for step in range(5)}


def test_a_bucketed_litdata_cache_carries_text_in_bucket_homogeneous_batches(toy_vae_run, tmp_path):
    folder = make_aspect_folder(tmp_path / "mixed", 12)
    cfg = load_config(TINY / "ldm-buckets.yaml", [
        f"cache.vae={toy_vae_run}", f"cache.dir={tmp_path / 'c'}", f"cache.data.train.params.root={folder}",
        *STREAMED, *TEXT])
    del cfg["cache"]["data"]["val"]  # one split: each bucket is a litdata part, each part a worker process
    prepare_stage2(cfg)
    encoder, _ = build_text_encoder(cfg)
    data = StreamingBucketLatents(str(tmp_path / "c"), "train")
    module = DataModule(data, batch_size=3, drop_last=False, seed=7, val_fraction=0.0)
    batches = list(module.train_dataloader())
    assert sum(len(batch["caption"]) for batch in batches) == len(data) and len({b["mean"].shape for b in batches}) > 1
    for batch in batches:  # one latent shape per batch, each item with its caption's context
        assert batch["context"].shape == (len(batch["caption"]), 16, 32)
        assert torch.allclose(batch["context"], encoder(batch["caption"]), atol=5e-3)  # fp16 storage
