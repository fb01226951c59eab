"""The shared training driver: run directory, checkpoints, resume, errors — on a toy module."""

import csv

import pytest
import torch

from ldm.training.callbacks import AtomicCheckpointIO
from ldm.training.driver import train


def steps_logged(run):
    with open(run / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_run_directory_checkpoints_and_resume(toy_cfg, tmp_path):
    runs = tmp_path / "runs"
    run = train("toy", str(toy_cfg), ["--cfg", str(toy_cfg), "--runs-dir", str(runs)])
    assert run.parent == runs / "toy" and run.name.startswith("toy-")
    assert (runs / "toy" / "latest").resolve() == run.resolve()
    assert (run / "config.yaml").is_file() and (run / "samples").is_dir()
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step0000004.ckpt", "step0000006.ckpt"]  # keep: 2 periodic + last
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    first = steps_logged(run)
    assert first == list(range(6))

    resumed = train("toy", str(toy_cfg), ["--resume", str(runs / "toy" / "latest"), "trainer.max_steps=10"])
    assert resumed == run.resolve()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    assert steps_logged(run) == list(range(10))  # appended, no duplicates


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_stepz=3", "trainer.max_stepz: unknown parameter"),
        ("model.params.learning_rat=1", "model.params.learning_rat"),
        ("model.params.learning_rate=fast", "model.params.learning_rate: expected float"),
        ("checkpoint.every=3", "checkpoint.every: unknown key"),
    ],
)
def test_bad_config_is_one_line_error(toy_cfg, tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as exit_info:
        train("toy", str(toy_cfg), ["--runs-dir", str(tmp_path / "runs"), override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "toy").exists()  # nothing created for a bad config


def test_resume_of_missing_run_is_clear(toy_cfg, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train("toy", str(toy_cfg), ["--resume", str(tmp_path / "runs" / "toy" / "latest")])
    assert "no run of that stage" in capsys.readouterr().err


def test_atomic_save_keeps_previous_checkpoint_on_failure(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError):
        io.save_checkpoint({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
