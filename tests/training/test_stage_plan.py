"""A stage is a plan, then a run: ``--dry-run`` prints the resolved plan and writes nothing; the plan is immutable;
the run executes it, reading each VAE once; every stage script answers ``--help`` with its own description before
torch loads."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import FrozenInstanceError

import pytest

import ldm.inference.loaders
from ldm.core.config import load_config
from ldm.io.runs import CONFIG_FILE
from ldm.training.cli import DEFAULT_CONFIGS, parse_args
from ldm.training.driver import train, validate
from ldm.training.plan import plan_stage
from ldm.training.stages import STAGES
from tests.aspect_folder import make_aspect_folder
from tests.paths import REPO_ROOT, TINY
from tests.sdxl_toy import write_xl_file

STAGE_SCRIPTS = ("train_vae", "train_ldm", "train_controlnet", "train_classifier", "train_reflow", "cache_latents")
HELP_SECONDS = 2.0


def plan_of(stage: str, argv: list[str]):
    args = parse_args(argv, DEFAULT_CONFIGS[stage])
    return plan_stage(stage, DEFAULT_CONFIGS[stage], args, STAGES[stage].resolve, validate)


def test_a_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    runs = tmp_path / "runs"
    cfg = str(TINY / "vae.yaml")
    assert train("vae", argv=["--cfg", cfg, "--runs-dir", str(runs), "--dry-run", "trainer.max_steps=7"]) is None
    out = capsys.readouterr().out
    assert not runs.exists()  # nothing written, not even the run directory
    assert out.startswith(f"stage vae: new run {runs.absolute()}/vae/tiny-vae-<time>")
    assert "model: ldm.systems.autoencoder.AutoencoderKLSystem" in out  # each object with its resolved params
    assert "    embed_dim: " in out and "train: ldm.data.shapes.ShapesDataset" in out
    assert "lightning.Trainer(max_steps=7," in out  # the override is resolved into the plan
    derived = load_config(cfg)["data"]["params"]["train"]["params"]["length"]
    assert f"training items: {derived}" in out
    for section in ("builds:", "trains:", "writes:", "lineage:"):
        assert f"\n{section}\n" in out
    assert f"{runs.absolute()}/vae/tiny-vae-<time>/{CONFIG_FILE}" in out


def test_the_plan_is_immutable_and_the_run_gets_a_copy(tmp_path):
    plan = plan_of("vae", ["--cfg", str(TINY / "vae.yaml"), "--runs-dir", str(tmp_path)])
    with pytest.raises(FrozenInstanceError):
        plan.stage = "ldm"
    with pytest.raises(TypeError):
        plan.config["model"]["target"] = "elsewhere"
    with pytest.raises(TypeError):
        plan.lineage["vae"] = "x"
    copy = plan.config_dict()
    copy["model"]["params"]["embed_dim"] = -1
    copy["trainer"]["max_steps"] = -1
    assert plan.config["model"]["params"]["embed_dim"] != -1 and plan.config["trainer"]["max_steps"] != -1
    assert isinstance(copy["model"]["params"]["ddconfig"]["ch_mult"], list)  # plain containers for OmegaConf


def test_a_bad_config_fails_in_the_plan_before_the_threads_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train("vae", argv=["--cfg", str(TINY / "vae.yaml"), "--runs-dir", str(tmp_path), "model.params.embed_dimm=3"])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert "threads:" not in captured.out + captured.err  # the one-line error stands alone
    assert captured.err.strip().count("\n") == 0 and "embed_dimm" in captured.err


def test_a_stage2_plan_resolves_the_cache_and_the_run_reads_the_vae_once(toy_vae_run, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    argv = ["--cfg", str(TINY / "ldm-class.yaml"), "--runs-dir", str(tmp_path / "runs"), f"cache.vae={toy_vae_run}",
            f"cache.dir={cache}", "trainer.max_steps=1", "callbacks=[]"]
    train("ldm", argv=[*argv, "--dry-run"])
    out = capsys.readouterr().out
    assert f"VAE (cache.vae): {toy_vae_run}/checkpoints/last.ckpt" in out
    assert f"latent cache: {cache}: missing; train 48, val 8 images to encode" in out
    assert "scale_factor: measured when the cache is built" in out and "n_classes: 168" in out
    assert f"{cache}/ (latent shards, meta.json)" in out and not cache.exists()

    reads = []
    real = ldm.inference.loaders.read_vae_state
    monkeypatch.setattr(ldm.inference.loaders, "read_vae_state",
                        lambda path, *a, **k: reads.append(path) or real(path, *a, **k))
    run = train("ldm", argv=argv)
    assert len([p for p in reads if "vae" in str(p)]) == 1, reads  # the cache's encoding and the system share it
    plan = plan_of("ldm", ["--resume", str(run)])
    assert "scale_factor: " in str(plan) and "check the latent cache" in str(plan)
    assert plan.config_dict() == load_config(run / CONFIG_FILE)  # the run saved the plan's config, unedited


def test_a_fine_tune_plan_names_the_base_s_scale_and_the_cached_text(tmp_path, capsys):
    ckpt, config = write_xl_file(tmp_path)
    argv = ["--cfg", str(TINY / "sdxl-lora.yaml"), "--runs-dir", str(tmp_path / "runs"), "--dry-run",
            f"model.params.base_ckpt={ckpt}", f"model.params.base_config={config}", f"cache.dir={tmp_path / 'cache'}",
            f"cache.data.train.params.root={make_aspect_folder(tmp_path / 'mixed', n=5)}"]
    train("ldm", argv=argv)
    out = capsys.readouterr().out
    assert "scale_factor: 0.13025 (the base's; the cache's measured one is not used)" in out
    assert "measured when the cache is built" not in out
    assert "text conditioning: cached embeddings of ldm.nets.conditioning.sdxl.SDXLConditioner" in out
    assert "encode every caption once with the frozen text encoder into the latent cache" in out
    train("ldm", argv=[*argv, "cache.text_embeddings=false"])
    assert "text conditioning" not in capsys.readouterr().out


def test_a_controlnet_plan_names_its_base_s_scale_not_the_cache_s(toy_ldm_run, toy_vae_run, tmp_path, capsys):
    argv = ["--cfg", str(TINY / "controlnet.yaml"), "--runs-dir", str(tmp_path / "runs"), "--dry-run",
            f"model.params.base={toy_ldm_run}", f"cache.vae={toy_vae_run}", f"cache.dir={tmp_path / 'cache'}"]
    train("controlnet", argv=argv)
    out = capsys.readouterr().out
    assert "scale_factor: the base's (read from its checkpoint; the cache's measured one is not used)" in out
    assert "measured when the cache is built" not in out  # the base's U-Net learnt on its own scale (its buffer)
    assert "check that the latent cache carries hints (edge maps)" in out and not (tmp_path / "cache").exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", STAGE_SCRIPTS)
def test_every_stage_answers_help_at_once_with_its_own_description(script):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, f"stages/{script}.py", "--help"], cwd=REPO_ROOT, capture_output=True,
                            text=True, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    doc = (REPO_ROOT / "stages" / f"{script}.py").read_text().split('"""')[1]
    assert doc.splitlines()[0] in result.stdout and "--dry-run" in result.stdout
    assert elapsed < HELP_SECONDS, f"{script} --help took {elapsed:.1f} s"


def test_stage_scripts_parse_before_the_heavy_imports():
    """Each stage script imports only the light command line at module level (torch waits for parsing)."""
    for script in STAGE_SCRIPTS:
        text = (REPO_ROOT / "stages" / f"{script}.py").read_text()
        top = [line for line in text.splitlines() if line.startswith(("import ", "from "))]
        assert all(line.startswith(("from ldm.training.cli", "from ldm.core.cli", "import sys")) for line in top), top
        assert len(text.splitlines()) <= 60


def test_stage_scripts_describe_themselves():
    descriptions = {(REPO_ROOT / "stages" / f"{s}.py").read_text().split('"""')[1].splitlines()[0] for s in STAGE_SCRIPTS}
    assert len(descriptions) == len(STAGE_SCRIPTS)
    assert isinstance(parse_args(["--dry-run"], "x.yaml"), argparse.Namespace)
