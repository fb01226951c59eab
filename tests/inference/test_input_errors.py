"""Errors that point the right way (one line, exit 2, the cause and the fix), a file's own config winning over
another --config, exported files and generated PNGs carrying the lineage hashes, and legacy runs whose config names
`runs/vae/latest` still sampling after the link moved (reported once), or refused naming the link when the VAE it
names now has another architecture."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors import safe_open

from ldm.core.config import ConfigError, load_config
from ldm.inference.pipeline import Pipeline
from ldm.io.lineage import read_lineage
from ldm.io.runs import CONFIG_FILE
from ldm.training.driver import train
from tests.conftest import TINY
from tests.scripts import load_script
from tests.training.test_run_lineage import FAST, copy_vae_run


@pytest.fixture(scope="module")
def txt2img():
    return load_script("txt2img")


@pytest.fixture(scope="module")
def stage2_run(toy_vae_run, workdir, tmp_path_factory):
    """A stage-2 run the driver wrote (config, lineage.json, checkpoint) on the toy VAE: 2 steps, no sample grid."""
    from ldm.training.cache import ensure_cache

    cfg = str(TINY / "ldm-text.yaml")
    return train("ldm", cfg, ["--cfg", cfg, "--runs-dir", str(tmp_path_factory.mktemp("input-errors")),
                              f"cache.vae={toy_vae_run}", f"cache.dir={workdir / 'cache' / 'toy-text'}", *FAST],
                 before_build=ensure_cache)


@pytest.fixture(scope="module")
def exported(stage2_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny.safetensors"
    assert load_script("export").main([str(stage2_run), "--out", str(out)]) == 0
    return out


def test_a_size_the_unet_cannot_halve_names_the_multiple(stage2_run, txt2img, tmp_path, capsys):
    code = txt2img.main(["--run", str(stage2_run), "--prompt", "a red circle", "--W", "18", "--H", "18",
                         "--steps", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--H 18 is not a multiple of 4" in err and "halves the latent 1 time(s)" in err and "16 or 20" in err


def test_another_config_for_a_file_that_carries_its_own_is_refused_naming_the_keys(exported, txt2img, tmp_path,
                                                                                   capsys):
    other = yaml.safe_load(exported.with_suffix(".yaml").read_text())
    other["model"]["params"]["objective"]["params"]["parameterization"] = "v"
    (tmp_path / "v.yaml").write_text(yaml.safe_dump(other))
    code = txt2img.main(["--ckpt", str(exported), "--config", str(tmp_path / "v.yaml"), "--prompt", "a red circle",
                         "--steps", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "model.params.objective.params.parameterization: 'eps' in the file, 'v' in --config" in err
    assert "drop --config" in err and "--no-ema" not in err
    code = txt2img.main(["--ckpt", str(exported), "--config", str(exported.with_suffix(".yaml")), "--prompt", "a red "
                         "circle", "--steps", "1", "--out", str(tmp_path / "o")])
    assert code == 0  # its own config, spelled out: accepted
    with pytest.raises(ConfigError, match="parameterization: 'eps' in the file, 'v' in"):  # from Python too
        Pipeline.from_checkpoint(exported, tmp_path / "v.yaml", device="cpu")


def test_exports_and_pngs_carry_the_lineage_hashes(stage2_run, exported, txt2img, tmp_path):
    vae = next(e for e in read_lineage(stage2_run)["inputs"] if e["role"] == "vae")["vae_hash"]
    with safe_open(str(exported), framework="pt") as f:
        assert json.loads(f.metadata()["ldm.lineage"])["vae"] == vae
    for source in (["--run", str(stage2_run)], ["--ckpt", str(exported)]):
        out = tmp_path / source[0].strip("-")
        assert txt2img.main([*source, "--prompt", "a red circle", "--steps", "1", "--out", str(out), "--no-grid"]) == 0
        png = next(out.glob("*.png"))
        with Image.open(png) as image:
            assert json.loads(image.text["ldm"])["lineage"]["vae"] == vae
            assert f"VAE hash: {vae}" in image.text["parameters"]


def test_a_vae_run_as_reflow_source_is_named(toy_vae_run, tmp_path, caplog):
    cfg = str(TINY / "ldm-reflow.yaml")
    with pytest.raises(SystemExit) as e:
        train("reflow", cfg, ["--cfg", cfg, "--runs-dir", str(tmp_path), f"reflow.source={toy_vae_run}"])
    assert e.value.code == 2
    line = caplog.records[-1].getMessage()
    assert "is not a stage-2 (latent diffusion) run" in line and "runs/ldm/" in line and "unet" not in line


def test_a_folder_of_images_smaller_than_the_recipe_s_is_one_line(tmp_path, caplog):
    folder = tmp_path / "small"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(folder / f"i{i}.png")
        (folder / f"i{i}.txt").write_text("a black square")
    cfg = str(TINY / "ldm-text.yaml")
    with pytest.raises(SystemExit) as e:
        train("ldm", cfg, ["--cfg", cfg, "--runs-dir", str(tmp_path / "runs"), "--data", str(folder)])
    assert e.value.code == 2
    assert "smaller than min_size=16" in caplog.records[-1].getMessage() and "at least min_size" in caplog.text


@pytest.fixture
def legacy_run(stage2_run, toy_vae_run, tmp_path):
    """A copy of the module's stage-2 run whose config names its VAE by `runs/vae/latest`, as runs did before they
    pinned their inputs; the link at a copy of its VAE."""
    runs = tmp_path / "runs"
    copy_vae_run(Path(toy_vae_run), runs, "A")
    run = runs / "ldm" / "legacy"
    shutil.copytree(stage2_run, run)
    cfg = load_config(run / CONFIG_FILE)
    cfg.pop("lineage", None)
    cfg["cache"]["vae"] = cfg["model"]["params"]["first_stage"] = str(runs / "vae" / "latest")
    (run / CONFIG_FILE).write_text(yaml.safe_dump(cfg))
    (run / "lineage.json").unlink()
    return runs, run


def test_a_legacy_run_samples_after_its_vae_link_moved_reported_once(legacy_run, toy_vae_run, txt2img, tmp_path,
                                                                    caplog):
    runs, run = legacy_run
    copy_vae_run(Path(toy_vae_run), runs, "B", perturb=0.01)
    caplog.set_level(logging.WARNING)
    for i in range(2):
        assert txt2img.main(["--run", str(run), "--prompt", "a red circle", "--steps", "1",
                             "--out", str(tmp_path / f"o{i}")]) == 0
    moved = [r for r in caplog.records if "now names" in r.getMessage()]
    assert len(moved) == 1 and "using the run's own VAE weights" in moved[0].getMessage()


def test_sampling_or_exporting_a_legacy_run_after_its_link_moved_to_another_architecture_names_the_link(
        legacy_run, toy_vae_run, txt2img, tmp_path, capsys):
    runs, run = legacy_run
    copy_vae_run(Path(toy_vae_run), runs, "B", widen=True)
    code = txt2img.main(["--run", str(run), "--prompt", "a red circle", "--steps", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "first_stage" in err and "vae/latest now names" in err and "another architecture" in err
    code = load_script("export").main([str(run), "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "another architecture" in err and not (tmp_path / "x.safetensors").exists()
