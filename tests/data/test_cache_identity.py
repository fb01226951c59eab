"""A latent cache is its content: keyed by the hash of what it was built from (VAE weights, source files with sizes
and times, captions, labels, resolution and crop rules, shard size); a cache of other sources is refused or rebuilt
into a folder of its own with a line saying why; finished shards are reused only when they hold exactly the items
expected; a finished cache's counts are checked against its shards."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.core.config import load_config
from ldm.data.cache_identity import built_from, cache_identity
from ldm.data.latents import CacheError, LatentDataset
from ldm.training.cache import ensure_cache, make_cache
from ldm.training.presets import FolderRequest, apply_folder
from tests.paths import REPO_ROOT, TINY


def draw(folder: Path, names: list[str], seed: int = 0) -> None:
    """Images of a drawn square (20 px) with a caption file each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        pixels = np.full((20, 20, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        top, left = rng.integers(0, 10, 2)
        pixels[top:top + 8, left:left + 8] = rng.integers(0, 255, 3)
        Image.fromarray(pixels).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a square number {name}")


def folder_cfg(root: Path, vae: str, cache_root: Path, *extra: str) -> dict:
    cfg = load_config(TINY / "ldm-text.yaml", [f"cache.vae={vae}", f"cache.dir={cache_root / 'c'}", *extra])
    apply_folder(cfg, FolderRequest(str(root)))
    return cfg


def cached_paths(cache_dir: str, split: str = "train") -> list[str]:
    data = LatentDataset(cache_dir, split, check=False)
    return [data[i]["path"] for i in range(len(data))]


def test_identity_is_a_function_of_a_plain_dict():
    spec = {"vae": "abc", "shard_size": 4, "splits": {"train": {"items": 3}}}
    assert cache_identity(spec) == cache_identity(json.loads(json.dumps(spec)))
    assert cache_identity(spec) != cache_identity({**spec, "buckets": [[16, 16]]})  # a new field changes it


def test_added_images_and_edited_captions_give_a_new_cache(tmp_path, toy_vae_run, caplog):
    root = tmp_path / "captioned"
    draw(root, [f"img{i}" for i in range(12)])
    cfg = folder_cfg(root, toy_vae_run, tmp_path)
    first = ensure_cache(cfg)
    first_dir = cfg["cache"]["dir"]
    draw(root, ["img12", "img13", "img14"], seed=1)
    caplog.set_level(logging.INFO, logger="ldm")
    cfg = folder_cfg(root, toy_vae_run, tmp_path)
    second = ensure_cache(cfg)
    assert cfg["cache"]["dir"] != first_dir and second["count"] == first["count"] + 3
    assert "was built from other sources" in caplog.text and "items" in caplog.text
    assert cfg["data"]["params"]["train"]["params"]["cache_dir"] == cfg["cache"]["dir"]  # the run reads the new one
    (root / "img3.txt").write_text("an edited caption")
    os.utime(root / "img3.txt", ns=(1, 1))
    cfg = folder_cfg(root, toy_vae_run, tmp_path)
    third = ensure_cache(cfg)
    captions = [item["caption"] for split in ("train", "val") for item in LatentDataset(cfg["cache"]["dir"], split)]
    assert third["identity"] != second["identity"] and "an edited caption" in captions
    caplog.clear()
    again = folder_cfg(root, toy_vae_run, tmp_path)
    assert ensure_cache(again)["identity"] == third["identity"] and again["cache"]["dir"] == cfg["cache"]["dir"]
    assert "caching" not in caplog.text


def test_a_finished_cache_is_not_relabelled_as_another_folder_s(tmp_path, toy_vae_run, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    draw(a, [f"img{i}" for i in range(8)])
    draw(b, [f"pic{i}" for i in range(8)], seed=3)
    cfg = folder_cfg(a, toy_vae_run, tmp_path)
    ensure_cache(cfg)
    spec = importlib.util.spec_from_file_location("cache_latents_script", REPO_ROOT / "stages" / "cache_latents.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as e:
        script.main(["--cfg", str(TINY / "ldm-text.yaml"), "--vae", str(toy_vae_run), "--data", str(b),
                     "--out", cfg["cache"]["dir"]])
    assert e.value.code == 2
    assert "holds a finished cache of other sources" in capsys.readouterr().err
    assert all(p.startswith("img") for p in cached_paths(cfg["cache"]["dir"]))


def test_an_interrupted_cache_resumed_after_images_were_added_holds_each_image_once(tmp_path, toy_vae_run):
    root = tmp_path / "captioned"
    draw(root, [f"img{i}" for i in range(14)])
    cfg = folder_cfg(root, toy_vae_run, tmp_path, "cache.shard_size=4")
    make_cache(cfg)
    cache = Path(cfg["cache"]["dir"])
    meta = json.loads((cache / "meta.json").read_text())
    (cache / "meta.json").write_text(json.dumps({**meta, "complete": False}))  # interrupted before the last shard
    for last in sorted((cache / "train").glob("shard-*"))[-2:]:
        last.unlink()
    draw(root, ["a0", "a1", "a2"], seed=5)  # sorted first: every later image moves
    cfg = folder_cfg(root, toy_vae_run, tmp_path, "cache.shard_size=4")
    cfg["cache"]["dir"] = str(cache)
    meta = make_cache(cfg)
    paths = cached_paths(str(cache))
    assert len(paths) == len(set(paths)) == meta["splits"]["train"]["items"]
    added = {"a0.png", "a1.png", "a2.png"}
    assert added & set(paths + cached_paths(str(cache), "val")) == added


def test_a_damaged_cache_is_refused(tmp_path, toy_vae_run):
    root = tmp_path / "captioned"
    draw(root, [f"img{i}" for i in range(14)])
    cfg = folder_cfg(root, toy_vae_run, tmp_path, "cache.shard_size=4")
    ensure_cache(cfg)
    sorted(Path(cfg["cache"]["dir"], "train").glob("shard-*.safetensors"))[-1].unlink()
    with pytest.raises(CacheError, match="is damaged: meta.json records 1[0-9] train items, its shards hold"):
        ensure_cache(cfg)


def test_built_from_covers_sources_captions_and_crop_rules(tmp_path):
    from ldm.data.folder import ImageFolderDataset

    root = tmp_path / "f"
    draw(root, ["x", "y"])
    node = {"target": "ldm.data.folder.ImageFolderDataset", "params": {"root": str(root), "size": 16}}
    spec = built_from("v", {"train": ImageFolderDataset(str(root), 16)}, {"train": node}, 4)
    (root / "y.txt").write_text("other")
    changed = built_from("v", {"train": ImageFolderDataset(str(root), 16)}, {"train": node}, 4)
    cropped = {"train": {**node, "params": {**node["params"], "center_crop": False}}}
    other_crop = built_from("v", {"train": ImageFolderDataset(str(root), 16)}, cropped, 4)
    assert len({cache_identity(spec), cache_identity(changed), cache_identity(other_crop)}) == 3
