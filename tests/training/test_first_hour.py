"""What a new user meets in the first hour, each fixed: a resumable loader (no "not resumable" false alarm), a
complete resume command on a stop, a model summary without an empty FLOPs column."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.types import _Stateful

from ldm.core.config import instantiate_from_config, load_config
from ldm.data.module import DataModule
from ldm.training.driver import resume_command
from ldm.training.summary import summary_callback, summary_table
from tests.paths import TINY


def test_the_training_loader_is_resumable_for_lightning():
    """Lightning warns "dataloader is not resumable" unless every loader has state_dict / load_state_dict; the
    position itself comes back through DataModule.resume_at."""
    data = DataModule(train=torch.utils.data.TensorDataset(torch.arange(10.0)), batch_size=2, val_fraction=0.2)
    loader = data.train_dataloader()
    assert isinstance(loader, _Stateful) and isinstance(data.val_dataloader(), _Stateful)
    data.resume_at(2)
    assert [int(x) for (b,) in loader for x in b][:2] != []  # still iterates, from the resumed position
    assert loader.state_dict() == {}


def test_the_resume_command_is_complete_and_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stages/train_vae.py", "--cfg", "x.yaml"])
    assert resume_command("vae", Path("runs/vae/a b")) == f"python stages/train_vae.py --resume '{tmp_path}/runs/vae/a b'"
    monkeypatch.setattr(sys, "argv", ["pytest"])  # not started as a script: the stage's own
    assert resume_command("ldm", Path("r")) == f"python stages/train_ldm.py --resume {tmp_path}/r"


def test_the_model_summary_has_no_flops_column(caplog):
    system = instantiate_from_config(load_config(TINY / "vae.yaml")["model"], "model")
    table = summary_table(system)
    assert "FLOPs" not in table and "Flops" not in table
    assert [c.strip() for c in table.splitlines()[0].split(" | ")][1:] == ["Name", "Type", "Params", "Mode"]
    n = sum(p.numel() for p in system.parameters())
    assert any(line.endswith("Total params") for line in table.splitlines()) and n > 0
    kwargs = {"max_steps": 3}
    callback = summary_callback(kwargs)
    assert kwargs["enable_model_summary"] is False and callback is not None  # Lightning's off, ours on
    assert summary_callback({"enable_model_summary": False}) is None
    with caplog.at_level(logging.INFO, logger="ldm"):
        callback.on_fit_start(type("T", (), {"is_global_zero": True})(), system)
    assert "Trainable params" in caplog.text


def test_export_of_a_vae_run_says_plainly_what_it_is(toy_vae_run, tmp_path, capsys):
    from tests.scripts import load_script

    export = load_script("export")
    assert export.main([str(toy_vae_run), "--out", str(tmp_path / "x.safetensors")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {toy_vae_run} is not a stage-2 (latent diffusion) run: its model is "
                                   "ldm.systems.autoencoder.AutoencoderKLSystem")
    assert "threads:" not in captured.out and captured.err.count("\n") == 1  # the error stands alone


def test_make_edges_help_shows_its_defaults_and_no_config(capsys):
    from tests.scripts import load_script

    with pytest.raises(SystemExit):
        load_script("make_edges").parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Canny low threshold (default: 100)" in text and "Canny high threshold (default: 200)" in text
    assert "config" not in text and "--threads N" in text


def test_few_steps_default_to_ddim_on_the_command_line():
    from ldm.diffusion.sampling import FEW_STEPS, default_sampler
    from tests.scripts import load_script

    assert default_sampler(4) == default_sampler(FEW_STEPS) == "ddim" and default_sampler(FEW_STEPS + 1) == "dpmpp_2m"
    txt2img = load_script("txt2img")
    assert txt2img.parse_args(["--prompt", "x", "--steps", "4"]).sampler == "ddim"
    assert txt2img.parse_args(["--prompt", "x"]).sampler == "dpmpp_2m"  # 20 steps by default
    assert txt2img.parse_args(["--prompt", "x", "--steps", "4", "--sampler", "dpmpp_2m"]).sampler == "dpmpp_2m"


def test_a_folder_recipe_is_sized_by_epochs_of_its_data(toy_vae_run, tmp_path):
    from PIL import Image

    from tests.training.test_stage_plan import plan_of

    for k, name in enumerate(("one", "two", "three")):
        (tmp_path / "digits" / name).mkdir(parents=True)
        for i in range(40):
            Image.new("L", (20, 20), 60 * k + i).save(tmp_path / "digits" / name / f"{i}.png")
    argv = ["--cfg", "configs/ldm/folder-class.yaml", "--data", str(tmp_path / "digits"), f"cache.vae={toy_vae_run}",
            f"cache.dir={tmp_path / 'cache'}", "data.params.batch_size=16"]
    plan = plan_of("ldm", argv)
    items = int(dict(plan.derived)["training items"])
    assert 100 <= items < 120  # 120 images, about 5 % held out
    steps = 50 * (items // 16)  # folder_epochs: 50, the data module drops a last partial batch
    assert plan.config["trainer"]["max_steps"] == steps and steps < 4000  # below the recipe's 4,000
    assert plan.config["trainer"]["val_check_interval"] == steps // 10
    assert f"max_steps: {steps} = 50 epochs × {items // 16} batches of 16 ({items} training items)" in str(plan)
    assert "best.ckpt (by val/loss, min)" in str(plan)
    kept = plan_of("ldm", [*argv, "trainer.max_steps=7"])  # an explicit length wins
    assert kept.config["trainer"]["max_steps"] == 7 and "max_steps" not in dict(kept.derived)


def test_the_progress_line_says_when_validation_stops_improving():
    from ldm.training.progress import Improvement

    watch = Improvement("val/loss", "min")
    assert watch.update({"val/loss": 0.2}, 500) == "val/loss best so far"
    assert watch.update({"val/loss": 0.126}, 1000) == "val/loss best so far"
    assert watch.update({"val/loss": 0.14}, 1500) == "val/loss stopped improving: best 0.126 at step 1000, 1 validation ago"
    assert watch.update({"val/loss": 0.163}, 2500).endswith("2 validations ago")
    assert watch.update({"val/psnr": 30.0}, 3000) == ""  # not the watched metric
    assert Improvement("val/psnr", "max").update({"val/psnr": 30.0}, 1) == "val/psnr best so far"
