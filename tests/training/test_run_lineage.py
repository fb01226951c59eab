"""Runs pin what they were built from: `runs/vae/latest` and relative paths resolved to the exact checkpoint in the
run's config.yaml (the user's spelling kept under `lineage:`), a lineage.json written once, and a resume refused when
its objective, recipe or inputs are not the run's own — without touching the run's config.yaml."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from ldm.core.config import instantiate_from_config, load_config
from ldm.io.checkpoints import save_torch_atomic, state_dict_of, load_file
from ldm.io.lineage import LINEAGE_FILE, read_lineage
from ldm.io.runs import CHECKPOINT_DIR, CONFIG_FILE, LAST_CHECKPOINT, point_latest
from ldm.training.driver import train
from tests.conftest import TINY

FAST = ["trainer.max_steps=2", "callbacks=[]", "trainer.val_check_interval=2", "checkpoint.every_n_train_steps=2"]


def copy_vae_run(source: Path, runs: Path, name: str, perturb: float = 0.0, widen: bool = False) -> Path:
    """A VAE run under ``runs/vae/<name>`` made from ``source``: the same weights, nudged ones (``perturb``), or a VAE
    of another width (``widen``: a freshly built network of twice the channels), and ``runs/vae/latest`` at it."""
    run = runs / "vae" / name
    shutil.copytree(source, run)
    ckpt_path = run / CHECKPOINT_DIR / LAST_CHECKPOINT
    ckpt = load_file(ckpt_path)
    if widen:
        cfg = load_config(run / CONFIG_FILE)
        cfg["model"]["params"]["ddconfig"]["ch"] *= 2
        (run / CONFIG_FILE).write_text(yaml.safe_dump(cfg))
        ckpt["state_dict"] = instantiate_from_config(cfg["model"]).state_dict()
    elif perturb:
        ckpt["state_dict"] = {k: v + perturb if v.is_floating_point() else v for k, v in state_dict_of(ckpt).items()}
    save_torch_atomic(ckpt, ckpt_path)
    point_latest(run)
    return run


def two_vaes_under(folder: Path, toy_vae_run) -> tuple:
    """runs/vae/A (the session's toy VAE run: written, untrained) as latest under ``folder``; a function that makes B
    (nudged weights) latest."""
    runs = folder / "runs"
    a = copy_vae_run(Path(toy_vae_run), runs, "A")
    return runs, a, lambda **kw: copy_vae_run(Path(toy_vae_run), runs, "B", **({"perturb": 0.01} | kw))


@pytest.fixture
def two_vaes(tmp_path, toy_vae_run):
    """runs/vae/A as latest in this test's folder, and the function that makes B latest."""
    return two_vaes_under(tmp_path, toy_vae_run)


def train_ldm(runs: Path, cache: Path, *extra: str) -> Path:
    cfg = str(TINY / "ldm-text.yaml")
    return train("ldm", cfg, ["--cfg", cfg, "--runs-dir", str(runs), f"cache.vae={runs / 'vae' / 'latest'}",
                              f"cache.dir={cache}", *FAST, *extra])


@pytest.fixture(scope="module")
def pinned_run(tmp_path_factory, toy_vae_run):
    """(runs, A, a stage-2 run on runs/vae/latest = A, its cache), trained once for the tests that only read it or
    are refused before they write (a test that moves the link or resumes trains its own)."""
    folder = tmp_path_factory.mktemp("lineage")
    runs, a, _ = two_vaes_under(folder, toy_vae_run)
    return runs, a, train_ldm(runs, folder / "cache"), folder / "cache"


@pytest.mark.slow
def test_a_run_pins_the_vae_and_records_its_lineage(pinned_run):
    runs, a, run, cache = pinned_run
    saved = load_config(run / CONFIG_FILE)
    pinned = str((a / CHECKPOINT_DIR / LAST_CHECKPOINT).resolve())
    assert saved["cache"]["vae"] == saved["model"]["params"]["first_stage"] == pinned
    assert saved["lineage"]["cache.vae"] == str(runs / "vae" / "latest")  # the user's spelling kept beside it
    record = read_lineage(run)
    vae = next(e for e in record["inputs"] if e["key"] == "cache.vae")
    meta = json.loads((cache / "meta.json").read_text())
    assert vae["path"] == pinned and vae["step"] == 6 and vae["vae_hash"] == meta["vae"]["hash"]
    assert record["latent_cache"]["vae_hash"] == meta["vae"]["hash"]


@pytest.mark.slow
def test_a_resume_with_another_objective_is_refused_and_keeps_the_config(pinned_run, caplog):
    _, _, run, cache = pinned_run
    config_before = (run / CONFIG_FILE).read_bytes()
    for extra in (["model.params.objective.params.parameterization=v"],
                  ["--cfg", str(TINY / "ldm-flow.yaml"), f"cache.dir={cache}"]):
        caplog.clear()
        with pytest.raises(SystemExit) as e:
            train("ldm", None, ["--resume", str(run), *extra])
        assert e.value.code == 2
        line = caplog.records[-1].getMessage()
        assert "model.params.objective" in line and "in the run but" in line and "start a new run" in line
    assert (run / CONFIG_FILE).read_bytes() == config_before


@pytest.fixture(scope="module")
def moved_link(tmp_path_factory, toy_vae_run):
    """(runs, A, a stage-2 run pinned to A, its cache, its lineage.json as written) after runs/vae/latest moved on to
    B (nudged weights): trained once for the test that resumes it and the one that builds a ControlNet on it (either
    order holds: the ControlNet only reads the base, a resume keeps its lineage and VAE)."""
    folder = tmp_path_factory.mktemp("moved-link")
    runs, a, make_b = two_vaes_under(folder, toy_vae_run)
    run = train_ldm(runs, folder / "cache")
    lineage = (run / LINEAGE_FILE).read_bytes()
    make_b()
    return runs, a, run, folder / "cache", lineage


@pytest.mark.slow
def test_a_resume_after_the_vae_link_moved_is_refused_and_its_own_config_resumes_keeping_the_lineage(
        moved_link, caplog):
    runs, a, run, cache, lineage = moved_link
    with pytest.raises(SystemExit):  # the recipe's spelling, runs/vae/latest, now names B
        train_ldm(runs, cache, "--resume", str(run))
    assert "lineage.json" in caplog.records[-1].getMessage() and str(a.resolve()) in caplog.records[-1].getMessage()
    train("ldm", None, ["--resume", str(run), "trainer.max_steps=3"])  # its own config: pinned to A, resumes
    assert load_file(run / CHECKPOINT_DIR / LAST_CHECKPOINT)["global_step"] == 3
    assert (run / LINEAGE_FILE).read_bytes() == lineage  # written once, never rewritten on resume


@pytest.mark.slow
def test_a_legacy_run_resumed_after_the_link_moved_and_the_cache_was_deleted_is_refused(two_vaes, tmp_path, caplog):
    runs, _, make_b = two_vaes
    run = train_ldm(runs, tmp_path / "cache")
    cfg = load_config(run / CONFIG_FILE)  # as runs were written before they pinned their inputs
    cfg.pop("lineage")
    cfg["cache"]["vae"] = cfg["model"]["params"]["first_stage"] = str(runs / "vae" / "latest")
    (run / CONFIG_FILE).write_text(yaml.safe_dump(cfg))
    (run / LINEAGE_FILE).unlink()
    shutil.rmtree(tmp_path / "cache")
    make_b()
    with pytest.raises(SystemExit):
        train("ldm", None, ["--resume", str(run), "trainer.max_steps=3"])
    assert "its checkpoint holds VAE weights" in caplog.records[-1].getMessage()
    assert not (tmp_path / "cache").exists()  # refused before the cache was rebuilt with the wrong VAE


def test_resuming_a_vae_run_as_stage_2_names_the_right_script(two_vaes, caplog):
    _, a, _ = two_vaes
    with pytest.raises(SystemExit) as e:
        train("ldm", None, ["--resume", str(a)])
    assert e.value.code == 2
    line = caplog.records[-1].getMessage()
    assert "is a vae run" in line and "train_vae.py --resume" in line and "cache:" not in line


def test_pinned_weights_hash_is_the_cache_s(toy_vae_run):
    from ldm.inference.loaders import load_autoencoder
    from ldm.io.lineage import vae_hash_of

    ckpt = Path(toy_vae_run) / CHECKPOINT_DIR / LAST_CHECKPOINT
    assert vae_hash_of(ckpt) == load_autoencoder(toy_vae_run)[1]["hash"]
    assert torch.is_tensor(next(iter(state_dict_of(load_file(ckpt)).values())))


@pytest.mark.slow
def test_a_controlnet_after_a_newer_vae_caches_with_its_base_s_vae(moved_link, tmp_path, caplog):
    """VAE A → stage 2 → VAE B becomes latest → ControlNet with the recipe's `cache.vae: runs/vae/latest`: its cache
    is encoded by A, whose weights the base holds, not by B."""
    runs, a, base, _, _ = moved_link
    caplog.set_level(logging.INFO, logger="ldm")
    cfg = str(TINY / "controlnet.yaml")
    run = train("controlnet", cfg, ["--cfg", cfg, "--runs-dir", str(runs), *FAST,
                                    f"model.params.base={runs / 'ldm' / 'latest'}",
                                    f"cache.vae={runs / 'vae' / 'latest'}", f"cache.dir={tmp_path / 'hints'}"])
    assert "encoding with the base's own VAE" in caplog.text
    meta = json.loads((tmp_path / "hints" / "meta.json").read_text())
    assert meta["vae"]["hash"] == next(e for e in read_lineage(base)["inputs"] if e["key"] == "cache.vae")["vae_hash"]
    saved = load_config(run / CONFIG_FILE)
    assert saved["cache"]["vae"] == str((a / CHECKPOINT_DIR / LAST_CHECKPOINT).resolve())
    assert saved["model"]["params"]["base"] == str((base / CHECKPOINT_DIR / LAST_CHECKPOINT).resolve())
