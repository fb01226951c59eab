"""Progress in a log file, the run's last step (validation and grid), threads, and the noise a user cannot act on."""

from __future__ import annotations

import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ldm.core.threads import ThreadsError, apply_threads, resolve_threads
from ldm.training.progress import LineProgress, StepBar, progress_callback, total_epochs, total_steps
from tests.paths import REPO_ROOT, TINY
from tests.procs import env

NOISE = ("Tip:", "LeafSpec", "weights_only", "model summary", "manual optimization", "module(s) in eval mode",
         "smaller than the logging interval")


def fake_trainer(max_steps: int, batches: int, epoch: int = 0, max_epochs: int = -1, accumulate: int = 1):
    return SimpleNamespace(max_steps=max_steps, num_training_batches=batches, current_epoch=epoch,
                           max_epochs=max_epochs, accumulate_grad_batches=accumulate, estimated_stepping_batches=0)


def test_epoch_total_of_a_step_based_run():
    assert total_epochs(fake_trainer(max_steps=4000, batches=1250)) == 4  # 3.2 epochs → 4 started
    assert total_epochs(fake_trainer(max_steps=100, batches=50, accumulate=2)) == 4
    assert total_epochs(fake_trainer(max_steps=-1, batches=50, max_epochs=7)) == 7
    assert total_steps(fake_trainer(max_steps=4000, batches=1250)) == 4000


def test_bar_in_a_terminal_lines_in_a_pipe():
    tty, pipe = SimpleNamespace(isatty=lambda: True), SimpleNamespace(isatty=lambda: False)
    assert isinstance(progress_callback({}, tty), StepBar)
    assert isinstance(progress_callback({}, pipe), LineProgress)
    assert progress_callback({"enable_progress_bar": False}, pipe) is None


@pytest.mark.parametrize("value, expected", [("1", 1), (3, 3), (" 2 ", 2)])
def test_threads_values(value, expected):
    assert resolve_threads(value) == expected


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", True])
def test_bad_threads_is_a_one_line_error(value):
    with pytest.raises(ThreadsError, match=r"^threads: expected a positive number of threads or 'auto', got"):
        resolve_threads(value, "threads")


def test_auto_threads_leaves_busy_cores_alone(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("os.getloadavg", lambda: (1.1, 1.0, 1.0))
    assert resolve_threads("auto") == 1
    monkeypatch.setattr("os.getloadavg", lambda: (0.05, 0.0, 0.0))
    assert resolve_threads(None) == 2
    monkeypatch.setattr("os.getloadavg", lambda: (5.0, 5.0, 5.0))
    assert resolve_threads("auto") == 1


def test_omp_num_threads_is_the_default(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(None) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "zero")
    with pytest.raises(ThreadsError, match="^OMP_NUM_THREADS: expected"):
        resolve_threads(None)


def test_apply_threads_sets_torch():
    previous = torch.get_num_threads()
    try:
        assert apply_threads("2") == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


@pytest.mark.slow
def test_run_through_a_pipe_logs_lines_and_ends_with_validation_and_grid(tmp_path):
    """20 steps of 16 batches per epoch, validation every 6: lines with the right epoch total, a validation and a
    grid at step 20, the threads line, and none of the known noise."""
    args = ["--cfg", str(TINY / "vae.yaml"), "--runs-dir", str(tmp_path), "--threads", "1", "trainer.max_steps=20",
            "trainer.enable_progress_bar=true", "trainer.enable_model_summary=true", "trainer.val_check_interval=6",
            "trainer.log_every_n_steps=50", "trainer.precision=bf16-mixed"]
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "stages" / "train_vae.py"), *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "threads: 1 (--threads; change with --threads N)" in lines
    assert any(re.fullmatch(r"step 1/20 \(5%\) · epoch 1/2 · train/rec_loss [\d.]+", line) for line in lines), lines
    last = [line for line in lines if line.startswith("step 20/20 (100%) · epoch 2/2 ·")]
    assert last and re.search(r" · [\d.]+ it/s · elapsed \d:\d\d:\d\d · ETA 0:00:00$", last[0]), lines
    assert any(line.startswith("validation at step 20: ") and "val/psnr" in line for line in lines), lines
    assert "\r" not in proc.stdout
    run = next((tmp_path / "vae").glob("tiny-vae-*"))
    assert (run / "samples" / "vae-step20.png").is_file() and (run / "samples" / "vae-step18.png").is_file()
    assert not [n for n in NOISE if n in proc.stdout + proc.stderr], proc.stderr


@pytest.mark.parametrize("script, argv", [
    ("txt2img", ["--prompt", "x"]), ("evaluate", ["vae", "--run", "r"]), ("export", ["src", "--out", "o"]),
    ("make_edges", ["--data", "d"]), ("bench", []),
])
def test_every_script_takes_threads(script, argv):
    from tests.scripts import load_script

    module = load_script(script)
    parse = module.build_parser().parse_args if hasattr(module, "build_parser") else module.parse_args
    assert parse([*argv, "--threads", "3"]).threads == "3"


def test_stages_take_threads_and_refuse_a_bad_count(capsys):
    import runpy

    from ldm.training.driver import parse_args

    assert parse_args(["--threads", "2", "trainer.max_steps=1"], "x.yaml").threads == "2"
    saved = sys.argv
    sys.argv = ["cache_latents.py", "--threads", "zero"]
    try:
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(REPO_ROOT / "stages" / "cache_latents.py"), run_name="__main__")
    finally:
        sys.argv = saved
    assert info.value.code == 2
    assert "error: --threads: expected a positive number of threads or 'auto', got 'zero'" in capsys.readouterr().err


def test_bench_threads_reads_the_last_rate_of_the_progress_lines():
    from ldm.bench.threads import last_rate

    out = ("step 1/300 (0%) · epoch 1/3 · train/loss 0.5\n"
           "step 61/300 (20%) · epoch 1/3 · train/loss 0.2 · 2.05 it/s · elapsed 0:00:30 · ETA 0:01:57\n"
           "noise\nstep 300/300 (100%) · epoch 3/3 · train/loss 0.1 · 2.31 it/s · elapsed 0:02:10 · ETA 0:00:00\n")
    assert last_rate(out) == (300, 2.31)
    assert last_rate("step 1/300 (0%) · epoch 1/3\n") is None
