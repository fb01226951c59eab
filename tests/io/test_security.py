"""No code from data runs: a crafted pickle is refused by every loading path and its payload never runs; config
targets outside the allowed packages (or that would load code inside them) are refused; dataset file names never
make the latent cache write outside its folder."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from ldm.core.config import (
    ConfigError,
    check_config,
    load_config,
)
from ldm.core.errors import UserError
from ldm.inference.loaders import build_system
from ldm.inference.pipeline import Pipeline
from ldm.io.checkpoints import CheckpointError, load_file
from ldm.io.runs import CHECKPOINT_DIR
from ldm.training.cache import make_cache
from ldm.training.driver import EXIT_BAD_INPUT, train
from scripts import txt2img
from tests.conftest import TINY
from tests.io.test_checkpoints import WritesAFile


@pytest.fixture
def evil(tmp_path):
    """(a checkpoint whose unpickling would write `marker`, marker) — real tensors beside the payload."""
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": 1, "payload": WritesAFile(marker)}, path)
    return path, marker


def poisoned_copy(run, dest, evil_path):
    """A copy of ``run`` whose checkpoints are all replaced by the crafted pickle."""
    shutil.copytree(run.resolve(), dest, ignore=shutil.ignore_patterns("samples"))
    for ckpt in (dest / CHECKPOINT_DIR).glob("*.ckpt"):
        shutil.copyfile(evil_path, ckpt)
    return dest


def test_load_file_refuses(evil):
    path, marker = evil
    with pytest.raises(CheckpointError, match="--unsafe-load"):
        load_file(path)
    assert not marker.exists()


def test_resume_refuses_before_building_anything(evil, toy_vae_run, tmp_path, capsys):
    path, marker = evil
    run = poisoned_copy(toy_vae_run, tmp_path / "vae-run", path)
    with pytest.raises(SystemExit) as exit_info:
        train("vae", str(TINY / "vae.yaml"), ["--resume", str(run)])
    assert exit_info.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "loading it would run code from the file" in err and "Traceback" not in err
    assert not marker.exists()


def test_pipeline_and_txt2img_refuse(evil, toy_ldm_run, tmp_path, capsys):
    path, marker = evil
    run = poisoned_copy(toy_ldm_run, tmp_path / "ldm-run", path)
    with pytest.raises(UserError, match="--unsafe-load"):
        Pipeline.from_run(run)
    assert txt2img.main(["--run", str(run), "--prompt", "x", "--out", str(tmp_path / "o1")]) == 2
    assert txt2img.main(["--ckpt", str(path), "--config", str(TINY.parents[0] / "sd" / "v1-inference.yaml"),
                         "--prompt", "x", "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.count("--unsafe-load") == 2 and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_stage2_config_naming_a_poisoned_vae_run_refuses(evil, toy_vae_run, tmp_path):
    path, marker = evil
    vae = poisoned_copy(toy_vae_run, tmp_path / "vae-run", path)
    cfg = load_config(TINY / "ldm-text.yaml", [f"cache.vae={vae}", f"cache.dir={tmp_path / 'cache'}"])
    with pytest.raises(CheckpointError, match="--unsafe-load"):
        make_cache(cfg, progress=False)
    with pytest.raises(CheckpointError, match="would run code"):  # a VAE named directly as the model's first stage
        build_system({**cfg["model"], "params": {**cfg["model"]["params"], "first_stage": str(vae)}})
    assert not marker.exists()


@pytest.mark.parametrize("target", [
    "os.system", "builtins.exec", "subprocess.Popen", "pickle.loads",  # outside the allowed packages
    "torch.hub.load", "torch.load", "torch.serialization.load", "torch.utils.cpp_extension.load_inline",
    "torch.ops.load_library", "torch.package.PackageImporter", "lightning.pytorch.cli.instantiate_class",
    "ldm.io.checkpoints.load_file", "ldm.io.safe_pickle.torch_load", "torch._C._jit_pass_inline",
])
def test_config_targets_that_would_run_code_are_refused(target, monkeypatch):
    monkeypatch.setenv("LDM_ALLOW_TARGETS", "os.,builtins.,subprocess.,pickle.")  # widening the list…
    if target.startswith(("os.", "builtins.", "subprocess.", "pickle.")):
        monkeypatch.delenv("LDM_ALLOW_TARGETS")  # …is the user's explicit choice; without it they are refused
        match = "outside the allowed packages"
    else:
        match = "is refused"  # …and never lifts the refusal of code-loading targets inside them
    with pytest.raises(ConfigError, match=match):
        check_config({"target": target, "params": {}}, "model")


def test_dataset_file_names_never_escape_the_cache(toy_vae_run, tmp_path):
    """Odd file names (dots, spaces, unicode, a link out of the folder) go into shards by index, never into paths."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "sub").mkdir(parents=True)
    outside.mkdir()
    for i, name in enumerate(["..evil.png", "sub/a b ü.png", ".hidden.png", "sub/..png"]):
        Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(data / name, format="PNG")
    Image.new("RGB", (16, 16), (1, 2, 3)).save(outside / "target.png")
    (data / "link.png").symlink_to(outside / "target.png")
    folder = {"target": "ldm.data.folder.ImageFolderDataset", "params": {"root": str(data), "size": 16}}
    cfg = load_config(TINY / "ldm-text.yaml", [f"cache.vae={toy_vae_run}", f"cache.dir={tmp_path / 'cache'}"])
    cfg["cache"]["data"] = {"train": folder, "val": folder}
    make_cache(cfg, progress=False)
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {"data", "outside", "cache"}
    assert sorted(p.name for p in outside.iterdir()) == ["target.png"]
    assert all(p.resolve().is_relative_to((tmp_path / "cache").resolve()) for p in (tmp_path / "cache").rglob("*"))
