"""Faults during training: non-finite losses (stop / skip, manual and automatic optimisation), weights that
turned non-finite are never saved, preflight of the run directory, and out-of-range or mistyped settings."""

from __future__ import annotations

import shutil
import struct
import zlib
from collections import namedtuple

import pytest
import torch
from PIL import Image

from ldm.core.config import ConfigError, load_config
from ldm.data.folder import DataWarning, ImageFolderDataset
from ldm.io.checkpoints import load_file
from ldm.io.runs import CHECKPOINT_DIR
from ldm.training.cache import ensure_cache
from ldm.training.driver import EXIT_BAD_INPUT, EXIT_NONFINITE, train
from ldm.training.guards import SKIPPED_METRIC, last_good_checkpoint
from tests.conftest import TINY
from tests.procs import logged
from tests.toy import TOY_CONFIG

POISON = "callbacks=[{{target: tests.faults.PoisonBatch, params: {{at_steps: [{}]}}}}]"


@pytest.fixture(autouse=True)
def allow_test_callbacks(monkeypatch):
    monkeypatch.setenv("LDM_ALLOW_TARGETS", "tests.")


def run_stage(stage: str, cfg: str, runs, *overrides: str, before_build=None):
    """train() in-process; returns (exit code or 0, the stage's newest run directory)."""
    try:
        train(stage, cfg, ["--cfg", cfg, "--runs-dir", str(runs), *overrides], before_build=before_build)
        code = 0
    except SystemExit as e:
        code = e.code
    latest = runs / stage / "latest"
    return code, latest.resolve() if latest.exists() else None


def assert_finite_checkpoints(run, steps: dict[str, int]) -> None:
    """Exactly these checkpoints (name → global step), every one loadable with finite weights."""
    found = {}
    for path in sorted((run / CHECKPOINT_DIR).glob("*.ckpt")):
        ckpt = load_file(path)
        found[path.name] = ckpt["global_step"]
        bad = [k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        assert not bad, f"{path.name}: non-finite {bad[:3]}"
    assert found == steps


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------- non-finite


@pytest.mark.slow
def test_vae_nan_stops_naming_the_step_and_last_good_checkpoint(tmp_path, capsys):
    vae = str(TINY / "vae.yaml")
    code, run = run_stage("vae", vae, tmp_path, POISON.format(4))
    assert code == EXIT_NONFINITE
    line = one_error_line(capsys.readouterr().err)
    assert "non-finite loss or gradients at step 4" in line
    assert f"last good checkpoint: {run / CHECKPOINT_DIR / 'last.ckpt'}" in line
    assert_finite_checkpoints(run, {"last.ckpt": 3, "step0000003.ckpt": 3})


@pytest.mark.parametrize("link_first", [False, True])
def test_the_last_good_checkpoint_is_last_ckpt_before_its_hard_linked_periodic_file(tmp_path, link_first):
    """``last.ckpt`` and the periodic file of its step are one inode (one mtime): the name given is ``last.ckpt``
    whichever the directory lists first."""
    assert last_good_checkpoint(tmp_path / "none").startswith("none yet in ")
    (tmp_path / "step0000001.ckpt").write_bytes(b"older")
    periodic, last = tmp_path / "step0000003.ckpt", tmp_path / "last.ckpt"
    first, second = (last, periodic) if link_first else (periodic, last)
    first.write_bytes(b"newest")
    second.hardlink_to(first)
    assert last_good_checkpoint(tmp_path) == str(last)


@pytest.mark.slow
def test_vae_nan_skip_drops_the_update_and_counts_it(tmp_path):
    vae = str(TINY / "vae.yaml")
    code, run = run_stage("vae", vae, tmp_path, POISON.format(1), "guard.nonfinite=skip", "trainer.max_steps=4")
    assert code == 0
    assert_finite_checkpoints(run, {"last.ckpt": 4, "step0000003.ckpt": 3})
    ckpt = load_file(run / CHECKPOINT_DIR / "last.ckpt")
    adam_steps = {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert adam_steps == {3.0}  # 4 steps, the poisoned one never reached the autoencoder's optimiser
    assert [v for k, v in ckpt["callbacks"].items() if k.startswith("NonFiniteGuard")] == [{"skipped": [1]}]
    assert logged(run, SKIPPED_METRIC) == {1: "1.0"}


def test_infinite_learning_rate_never_writes_nan_weights(tmp_path, capsys):
    """lr = inf turns the weights to inf in step 0; the save after it is refused, nothing is written."""
    vae = str(TINY / "vae.yaml")
    code, run = run_stage("vae", vae, tmp_path, "model.params.optimizer.params.lr=.inf", "checkpoint.every_n_train_steps=1")
    assert code == EXIT_NONFINITE
    line = one_error_line(capsys.readouterr().err)
    assert "weights became non-finite by step 1" in line and "checkpoint not written" in line
    assert_finite_checkpoints(run, {})


@pytest.fixture(scope="module")
def ldm_args(toy_vae_run, workdir):
    """Overrides pointing stage 2 at a latent cache of the session's tiny VAE (built once)."""
    args = [f"cache.vae={toy_vae_run}", f"cache.dir={workdir / 'cache' / 'toy-text'}"]
    ensure_cache(load_config(TINY / "ldm-text.yaml", args))
    return args + ["callbacks=[]", "trainer.max_steps=4"]


Case = namedtuple("Case", "mode code steps")


@pytest.mark.slow
@pytest.mark.parametrize("case", [Case("stop", EXIT_NONFINITE, {"last.ckpt": 3, "step0000003.ckpt": 3}),
                                  Case("skip", 0, {"last.ckpt": 4, "step0000003.ckpt": 3})], ids=["stop", "skip"])
def test_ldm_nan_at_step_3(tmp_path, ldm_args, case):
    cfg = str(TINY / "ldm-text.yaml")
    code, run = run_stage("ldm", cfg, tmp_path, *ldm_args, POISON.format(3), f"guard.nonfinite={case.mode}")
    assert code == case.code
    assert_finite_checkpoints(run, case.steps)  # EMA included: it never saw a NaN


# ---------------------------------------------------------------------------------------- preflight


@pytest.fixture
def toy_cfg(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(TOY_CONFIG)
    return str(path)


def test_unwritable_runs_dir_fails_before_training(toy_cfg, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _ = run_stage("toy", toy_cfg, blocker / "runs")
    assert code == EXIT_BAD_INPUT
    assert "cannot write to" in one_error_line(capsys.readouterr().err)


def test_full_disk_fails_before_training_and_before_resuming(toy_cfg, tmp_path, capsys, monkeypatch):
    code, run = run_stage("toy", toy_cfg, tmp_path / "runs", "trainer.max_steps=2")
    assert code == 0
    real = shutil.disk_usage
    monkeypatch.setattr("ldm.io.runs.shutil.disk_usage", lambda p: real(p)._replace(free=10 * 2**20))
    code, _ = run_stage("toy", toy_cfg, tmp_path / "other")
    assert code == EXIT_BAD_INPUT and not any((tmp_path / "other" / "toy").iterdir())  # no run directory
    assert "only 10 MiB free" in one_error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit):
        train("toy", toy_cfg, ["--resume", str(run), "trainer.max_steps=4"])
    assert "only 10 MiB free" in one_error_line(capsys.readouterr().err)
    assert load_file(run / CHECKPOINT_DIR / "last.ckpt")["global_step"] == 2  # untouched


# ------------------------------------------------------------------------------- settings out of range


@pytest.mark.parametrize("override, message", [
    ("trainer.max_steps=-5", "trainer: "),
    ("trainer.devices=0", "trainer: "),
    ("trainer.precision=17", "trainer.precision: expected one of"),
    ("checkpoint.keep=-3", "trainer: "),
    ("trainer.strategy=fsdp", "trainer: The strategy `fsdp` requires a GPU accelerator"),
    ("callbacks.0.x=1", "callbacks.0: expected a mapping with `target`"),
    ("guard.nonfinite=maybe", "guard.nonfinite: expected one of stop, skip, off"),
    ("guard.nan=stop", "guard.nan: unknown key"),
    ("gaurd.nonfinite=stop", "did you mean 'guard'"),
])
def test_out_of_range_settings_are_one_line_errors(toy_cfg, tmp_path, capsys, override, message):
    code, _ = run_stage("toy", toy_cfg, tmp_path / "runs", override)
    assert code == EXIT_BAD_INPUT
    assert message in one_error_line(capsys.readouterr().err)


def test_resume_with_another_architecture_names_the_keys(toy_cfg, tmp_path, capsys):
    code, run = run_stage("toy", toy_cfg, tmp_path / "runs", "trainer.max_steps=2")
    before = (run / "config.yaml").read_text()
    with pytest.raises(SystemExit) as exit_info:
        train("toy", toy_cfg, ["--resume", str(run), "model.params.hidden=4"])
    assert exit_info.value.code == EXIT_BAD_INPUT
    line = one_error_line(capsys.readouterr().err)
    assert "does not fit the model" in line and "net.weight: file (1, 1) vs model (4, 1)" in line
    assert (run / "config.yaml").read_text() == before  # the run is left as it was


def test_an_override_sets_a_list_item_by_index_and_past_the_end_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ncallbacks: [{target: ldm.training.guards.NonFiniteGuard}]\n")
    cfg = load_config(path, ["callbacks.0.params.mode=skip"])
    assert cfg["callbacks"] == [{"target": "ldm.training.guards.NonFiniteGuard", "params": {"mode": "skip"}}]
    with pytest.raises(ConfigError, match=r"cannot apply overrides callbacks.1.params.mode=skip: '1' is not an index"):
        load_config(path, ["callbacks.1.params.mode=skip"])


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG file whose header claims ``width`` × ``height`` pixels (a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_and_wrong_extension(tmp_path):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "good.png")
    Image.new("RGB", (32, 32), (30, 200, 30)).save(tmp_path / "really-a-jpeg.png", format="JPEG")
    (tmp_path / "bomb.png").write_bytes(png_header_only(40_000, 40_000))
    with pytest.warns(DataWarning) as record:
        ds = ImageFolderDataset(str(tmp_path), size=16)
    assert [name for name, _ in ds.skipped] == ["bomb.png"]
    assert sum("skipped 1 file" in str(w.message) for w in record) == 1
    assert sorted(ds[i]["path"] for i in range(len(ds))) == ["good.png", "really-a-jpeg.png"]  # content, not name
