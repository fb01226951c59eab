"""Your own images: --data / data.root presets, caption modes (none), natural class order, held-out splits, class
names kept by the cache and the run (n_classes checked), --class NAME, and disc_start against the run's length."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest
from PIL import Image

from ldm.core.config import ConfigError, load_config
from ldm.data.folder import DataWarning, ImageFolderDataset
from ldm.data.folder_layout import natural_key, summarize
from ldm.inference.loaders import PipelineError, resolve_class
from ldm.nets.autoencoder.losses import LPIPSWithDiscriminator
from ldm.training.cache import sync_classes
from ldm.training.driver import validate
from ldm.training.presets import FolderRequest, apply_folder, spread, take_folder_overrides
from tests.paths import REPO_ROOT, TINY

CLASSES = ["1", "10", "2"]  # sorted as strings: 1, 10, 2; naturally: 1, 2, 10


def write_images(folder, n, seed=0, size=20, grey=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (size, size) if grey else (size, size, 3)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(folder / f"img{i}.png")


@pytest.fixture
def class_folder(tmp_path):
    root = tmp_path / "digits"
    for k, name in enumerate(CLASSES):
        write_images(root / name, 6, seed=k, grey=True)
    return root


@pytest.fixture
def flat_folder(tmp_path):
    root = tmp_path / "photos"
    write_images(root, 40)
    return root


def test_natural_sort():
    assert sorted(["img10", "img9", "2", "10", "1", "b", "a"], key=natural_key) == ["1", "2", "10", "a", "b", "img9",
                                                                                    "img10"]


def test_class_folders_in_natural_order(class_folder):
    ds = ImageFolderDataset(str(class_folder), size=16)
    assert ds.captions == "subfolders" and ds.classes == ["1", "2", "10"]
    assert {r.rel.split("/")[0]: r.label for r in ds.records} == {"1": 0, "2": 1, "10": 2}


def test_flat_folder_without_captions_is_mode_none_and_quiet(flat_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        ds = ImageFolderDataset(str(flat_folder), size=16)
    assert ds.captions == "none" and {r.caption for r in ds.records} == {""}
    (flat_folder / "img0.txt").write_text("a caption")
    with pytest.warns(DataWarning, match="39 caption problem"):  # one .txt: the txt mode, the rest reported
        assert ImageFolderDataset(str(flat_folder), size=16).captions == "txt"
    assert ImageFolderDataset(str(flat_folder), size=16, captions="none").captions == "none"


def test_held_out_split_is_disjoint_and_stable(flat_folder, tmp_path):
    train = ImageFolderDataset(str(flat_folder), size=16, split="train", val_fraction=0.25)
    val = ImageFolderDataset(str(flat_folder), size=16, split="val", val_fraction=0.25)
    names = {r.rel for r in train.records} | {r.rel for r in val.records}
    assert len(names) == 40 and not {r.rel for r in train.records} & {r.rel for r in val.records} and val.records
    write_images(flat_folder / "more", 3, seed=9)  # adding images never moves the old ones
    again = ImageFolderDataset(str(flat_folder), size=16, split="val", val_fraction=0.25)
    assert {r.rel for r in val.records} <= {r.rel for r in again.records}
    split = tmp_path / "split"
    write_images(split / "train", 5)
    write_images(split / "val", 2, seed=1)
    assert len(ImageFolderDataset(str(split), size=16, split="val")) == 2
    assert summarize(split).split_dirs is not None


def test_preset_overrides_from_the_command_line():
    rest, request = take_folder_overrides(["trainer.max_steps=5", "data=folder", "data.root=x/", "data.captions=none"])
    assert rest == ["trainer.max_steps=5"] and request == FolderRequest("x/", "none")
    assert take_folder_overrides(["a=1"], data="d")[1] == FolderRequest("d", "auto")
    assert take_folder_overrides(["a=1"]) == (["a=1"], None)
    for bad, message in ((["data.captions=txt"], "needs its folder"), (["data=shapes", "data.root=x"], "only data preset"),
                         (["data.root=x", "data.captions=words"], "expected one of auto, metadata")):
        with pytest.raises(ConfigError, match=message):
            take_folder_overrides(bad)


def test_default_vae_recipe_on_a_flat_folder(flat_folder):
    cfg = load_config(REPO_ROOT / "configs" / "vae" / "shapes-kl-f4.yaml")
    lines = apply_folder(cfg, FolderRequest(str(flat_folder)))
    validate(cfg)
    train = cfg["data"]["params"]["train"]
    assert train == {"target": "ldm.data.folder.ImageFolderDataset",
                     "params": {"root": str(flat_folder), "size": 32, "captions": "none", "split": "train"}}
    assert cfg["data"]["params"]["val"]["params"]["split"] == "val" and cfg["name"] == "shapes-kl-f4-photos"
    assert "captions: none (a flat folder without metadata.jsonl or .txt captions" in lines[0]


def test_class_recipe_fills_n_classes_and_grid_labels(class_folder, flat_folder):
    cfg = load_config(REPO_ROOT / "configs" / "ldm" / "shapes-class.yaml")
    lines = apply_folder(cfg, FolderRequest(str(class_folder)))
    validate(cfg)
    assert cfg["model"]["params"]["cond_stage"]["params"]["n_classes"] == 3
    assert cfg["callbacks"][0]["params"]["conditions"] == [0, 1, 2]
    assert cfg["cache"]["dir"].startswith("cache/digits-32px-") and cfg["cache"]["data"]["val"]["params"]["split"] == "val"
    assert "classes: n_classes=3 from the folders (1=0, 2=1, 10=2)" in lines
    assert spread(100) == [0, 14, 28, 42, 57, 71, 85, 99]
    with pytest.raises(ConfigError, match="is class-conditional: --data needs one sub-folder of images per class"):
        apply_folder(load_config(REPO_ROOT / "configs" / "ldm" / "shapes-class.yaml"), FolderRequest(str(flat_folder)))
    with pytest.raises(ConfigError, match="is text-conditional, but .* has no captions"):
        apply_folder(load_config(REPO_ROOT / "configs" / "ldm" / "shapes-text.yaml"), FolderRequest(str(flat_folder)))


def test_n_classes_mismatch_names_both_numbers():
    cfg = load_config(TINY / "ldm-class.yaml")
    with pytest.raises(ConfigError, match=r"n_classes is 168, but the data has 3 classes .*params.n_classes=3, or"):
        sync_classes(cfg, {"classes": {"1": 0, "2": 1, "10": 2}})
    cfg["model"]["params"]["cond_stage"]["params"]["n_classes"] = 3
    sync_classes(cfg, {"classes": {"1": 0, "2": 1, "10": 2}})
    assert cfg["model"]["params"]["cond_stage"]["params"]["class_names"] == ["1", "2", "10"]


def test_class_by_name_or_index():
    names = ["1", "2", "10", "seven"]
    assert resolve_class("seven", names, 4) == 3 and resolve_class("10", names, 4) == 2  # the name wins
    assert resolve_class("3", names, 4) == 3 and resolve_class(3, None, 4) == 3
    with pytest.raises(PipelineError, match="'eight' is not a class of this run: its classes are 1, 2, 10, seven"):
        resolve_class("eight", names, 4)
    with pytest.raises(PipelineError, match="this run keeps no class names"):
        resolve_class("seven", None, 4)
    with pytest.raises(PipelineError, match="--class 9 is out of range: this run has classes 0..3"):
        resolve_class("9", names, 4)


def test_disc_start_fraction_and_past_the_end(caplog):
    loss = LPIPSWithDiscriminator(disc_start=0.75, perceptual_weight=0.0, disc_num_layers=1, disc_ndf=4)
    assert not loss.discriminator_active(10**6)  # unresolved before a fit
    loss.set_run_length(1500)
    assert loss.discriminator_iter_start == 1125 and loss.discriminator_active(1125) and not loss.discriminator_active(1124)
    late = LPIPSWithDiscriminator(disc_start=3001, perceptual_weight=0.0, disc_num_layers=1, disc_ndf=4)
    with caplog.at_level(logging.WARNING, logger="ldm"):
        late.set_run_length(1500)
    assert "disc_start=3001 is at or beyond the run's end (1500 steps): the discriminator never trains" in caplog.text
    with pytest.raises(ValueError, match="disc_start must be a step"):
        LPIPSWithDiscriminator(disc_start=-1, perceptual_weight=0.0)


def test_cache_built_from_other_data_is_refused(tmp_path):
    from ldm.data.latents import CacheError
    from ldm.training.cache import ensure_cache

    cfg = load_config(TINY / "ldm-class.yaml", [f"cache.dir={tmp_path / 'c'}"])
    (tmp_path / "c").mkdir()
    other = {"train": {"target": "ldm.data.folder.ImageFolderDataset", "params": {"root": "elsewhere"}}}
    (tmp_path / "c" / "meta.json").write_text(json.dumps({"complete": True, "data": other}))
    with pytest.raises(CacheError, match=r"other data than this config's cache.data \(cache.data.train.target: 'ldm.data.folder.ImageFolderDataset' "
                                        r"in the cache, 'ldm.data.shapes.ShapesDataset' in the config\)"):
        ensure_cache(cfg)


@pytest.mark.slow
def test_class_folder_end_to_end_keeps_names(class_folder, tmp_path, capsys):
    """A VAE and a class-conditional stage 2 on a folder of class sub-folders, each in one command; the cache and
    the run keep the name → label map; txt2img draws by name or index."""
    from ldm.training.driver import train
    from tests.scripts import load_script

    runs = str(tmp_path / "runs")
    vae = train("vae", None, ["--cfg", str(TINY / "vae.yaml"), "--runs-dir", runs, f"data.root={class_folder}"])
    assert vae.name.startswith("tiny-vae-digits-")
    cfg = str(TINY / "ldm-class.yaml")
    run = train("ldm", None, ["--cfg", cfg, "--runs-dir", runs, "--data", str(class_folder), f"cache.vae={vae}",
                              f"cache.dir={tmp_path / 'cache' / 'x'}"])
    out = capsys.readouterr().out
    assert "classes: n_classes=3 from the folders (1=0, 2=1, 10=2)" in out
    meta = json.loads(next((tmp_path / "cache").glob("digits-16px-*/meta.json")).read_text())
    assert meta["classes"] == {"1": 0, "2": 1, "10": 2}
    saved = load_config(run / "config.yaml")["model"]["params"]["cond_stage"]["params"]
    assert saved["n_classes"] == 3 and saved["class_names"] == ["1", "2", "10"]
    txt2img = load_script("txt2img")
    code = txt2img.main(["--run", str(run), "--class", "10", "--class", "0", "--steps", "2", "--out", str(tmp_path / "o"),
                         "--seed", "0", "--no-grid"])
    printed = capsys.readouterr().out
    assert code == 0 and '-s0-10.png  seed=0  "10"' in printed and '-s1-1.png  seed=1  "1"' in printed
    assert txt2img.main(["--run", str(run), "--class", "seven", "--out", str(tmp_path / "o")]) == 2
    assert "'seven' is not a class of this run: its classes are 1, 2, 10" in capsys.readouterr().err
    evaluate = load_script("evaluate")
    row = evaluate.main(["classes", "--run", str(run), "--n", "6", "--sampler", "ddim:2", "--csv",
                         str(tmp_path / "eval.csv"), "--classifier-cache", str(tmp_path / "clf")])
    printed = capsys.readouterr().out
    assert row["data"] == f"folder {class_folder}" and row["n"] == 6 and 0 <= row["class_accuracy_pct"] <= 100
    assert 0 <= row["reader_heldout_accuracy_pct"] <= 100 and row["fid"] >= 0
    assert f"note: measured on the folder {class_folder}: the reader is a CNN trained on the run's 17 training" in printed
    assert len(list((tmp_path / "clf").glob("folder-*.safetensors"))) == 1  # trained once, cached
