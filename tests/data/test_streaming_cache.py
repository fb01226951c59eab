"""The latent cache as litdata shards (local mode): round trip against the folder cache, resume of an interrupted
build without re-encoding finished parts, shards checked before training, an unreachable URI refused in one line,
and a stage-2 run that resumes mid-epoch exactly (every item of an epoch once)."""

import json

import lightning as L
import pytest
import torch
import yaml

from ldm.core.config import load_config
from ldm.data.latents import CacheError, LatentDataset
from ldm.data.streaming import StreamingLatents
from ldm.training.cache import ensure_cache, make_cache
from ldm.training.driver import EXIT_BAD_INPUT, train
from tests.conftest import TINY

pytestmark = pytest.mark.slow  # litdata's optimize starts worker processes; stage-2 runs end to end


def streaming_config(vae_run, tmp_path, *extra):
    return load_config(TINY / "ldm-text.yaml", [f"cache.vae={vae_run}", f"cache.dir={tmp_path / 'c'}",
                                                "cache.format=litdata", "cache.chunk_bytes=8KB", "cache.num_workers=1",
                                                *extra])


@pytest.fixture(scope="module")
def streamed(tiny_vae_run, tmp_path_factory):
    """A litdata cache of the tiny shapes (two parts of 24 train items) and the folder cache of the same data."""
    tmp = tmp_path_factory.mktemp("streamed")
    cfg = streaming_config(tiny_vae_run, tmp)
    meta = make_cache(cfg, progress=False)
    folder = load_config(TINY / "ldm-text.yaml", [f"cache.vae={tiny_vae_run}", f"cache.dir={tmp / 'folder'}"])
    make_cache(folder, progress=False)
    return cfg, meta, tmp


def test_round_trip_matches_the_folder_cache(streamed):
    cfg, meta, tmp = streamed
    folder = LatentDataset(str(tmp / "folder"), "train")
    assert meta["parts"] == {"train": 2, "val": 1} and meta["count"] == 56 and meta["latent_shape"] == [4, 8, 8]
    assert meta["scale_factor"] == pytest.approx(folder.meta["scale_factor"], rel=1e-6)
    data = StreamingLatents(str(tmp / "c"), "train", shuffle=False)
    assert len(data) == 48
    items = {item["index"]: item for item in data}
    assert sorted(items) == list(range(48))
    for i in (0, 23, 24, 47):
        assert torch.equal(items[i]["mean"], folder[i]["mean"]) and torch.equal(items[i]["std"], folder[i]["std"])
        assert items[i]["caption"] == folder[i]["caption"] and items[i]["label"] == folder[i]["label"]


def test_interrupted_build_resumes_without_reencoding_finished_parts(streamed, tiny_vae_run):
    cfg, meta, tmp = streamed
    meta_path = tmp / "c" / "meta.json"
    chunks = sorted((tmp / "c" / "shards" / "train").glob("chunk-*.bin"))
    stamps = {p.name: p.stat().st_mtime_ns for p in chunks}
    part_one = json.loads((tmp / "c" / "shards" / "train" / "index.json").read_text())["chunks"]
    sizes = [c["chunk_size"] for c in part_one]
    n_first = next(n for n in range(len(sizes) + 1) if sum(sizes[:n]) == 24)  # the first part's chunks (24 items)
    # as if killed after litdata indexed the second train part but before meta.json recorded it
    meta_path.write_text(json.dumps({**meta, "parts": {"train": 1}, "chunks": {"train": n_first}, "complete": False}))
    again = make_cache(cfg, progress=False)
    assert again["parts"] == {"train": 2, "val": 1} and again["scale_factor"] == pytest.approx(meta["scale_factor"])
    after = json.loads((tmp / "c" / "shards" / "train" / "index.json").read_text())["chunks"]
    assert sum(c["chunk_size"] for c in after) == 48 and len(after) == len(part_one)
    first_part = [c["filename"] for c in after[:n_first]]
    assert all((tmp / "c" / "shards" / "train" / name).stat().st_mtime_ns == stamps[name] for name in first_part)
    assert sorted(item["index"] for item in StreamingLatents(str(tmp / "c"), "train")) == list(range(48))


def test_truncated_shard_is_named_and_unreachable_uri_refused(streamed, tiny_vae_run, tmp_path):
    cfg, _, tmp = streamed
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(tmp / "c", broken / "c")
    meta = json.loads((broken / "c" / "meta.json").read_text())
    (broken / "c" / "meta.json").write_text(json.dumps({**meta, "uri": str(broken / "c" / "shards")}))
    chunk = sorted((broken / "c" / "shards" / "train").glob("chunk-*.bin"))[-1]
    chunk.write_bytes(chunk.read_bytes()[:100])
    bad = streaming_config(tiny_vae_run, broken)
    with pytest.raises(CacheError, match=f"corrupt latent shard {chunk}"):
        ensure_cache(bad)

    runs = tmp_path / "runs"
    cfg_path = str(TINY / "ldm-text.yaml")
    with pytest.raises(SystemExit) as stop:
        train("ldm", cfg_path, ["--cfg", cfg_path, "--runs-dir", str(runs), f"cache.vae={tiny_vae_run}",
                                f"cache.dir={tmp_path / 'remote'}", "cache.format=litdata",
                                "cache.uri=s3://ldm-no-such-bucket-for-tests/cache"])
    assert stop.value.code == EXIT_BAD_INPUT and not runs.exists()  # refused before a run folder exists


class SeenItems(L.Callback):
    """Records the cache index of every training item, per global step."""

    seen: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        SeenItems.seen[trainer.global_step] = batch["index"].tolist()


def test_stage2_streams_and_resumes_mid_epoch_exactly(streamed, tiny_vae_run, tmp_path, monkeypatch):
    _, _, tmp = streamed
    monkeypatch.setenv("LDM_ALLOW_TARGETS", "tests.")  # the recording callback below
    cfg = yaml.safe_load((TINY / "ldm-text.yaml").read_text())
    cfg["callbacks"] = [{"target": f"{__name__}.SeenItems"}]
    cfg["checkpoint"] = {"every_n_train_steps": 2}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    common = [f"cache.vae={tiny_vae_run}", f"cache.dir={tmp / 'c'}", "cache.format=litdata",
              "cache.chunk_bytes=8KB", "cache.num_workers=1"]
    SeenItems.seen = {}
    run = train("ldm", str(tmp_path / "cfg.yaml"), ["--cfg", str(tmp_path / "cfg.yaml"), "--runs-dir",
                                                    str(tmp_path / "runs"), *common, "trainer.max_steps=2"])
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["params"]["train"]["target"].endswith(
        "StreamingLatents")
    train("ldm", str(tmp_path / "cfg.yaml"), ["--resume", str(run), "trainer.max_steps=6"])
    assert sorted(SeenItems.seen) == list(range(6))
    epoch = [i for step in range(6) for i in SeenItems.seen[step]]
    assert sorted(epoch) == list(range(48))  # 6 batches of 8: every item once, across the resume
