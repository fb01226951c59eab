"""Helpers for tests that train in a subprocess: launch a stage script, wait for a moment, compare checkpoints."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from ldm.io.checkpoints import load_file
from tests.paths import REPO_ROOT

STAGES = REPO_ROOT / "stages"
POLL_S = 0.05
WAIT_S = 180


def env(**extra: str) -> dict:
    """The environment for training subprocesses: one thread each (shared cores), test callbacks allowed."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "LDM_ALLOW_TARGETS": "tests.", "PYTHONPATH": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1", **extra}


def slow_checkpoint_renames(delay_s: float) -> None:
    """In this process (a forked child's ``before``): each checkpoint rename waits ``delay_s`` after the temporary file
    is complete (``os.replace`` wrapped), so a test can kill the process inside that window. The production save has
    no hook for this."""
    replace = os.replace

    def slow_replace(src, dst, *args, **kwargs):
        if str(dst).endswith(".ckpt"):
            time.sleep(delay_s)
        return replace(src, dst, *args, **kwargs)

    os.replace = slow_replace


def launch(stage: str, args: list[str], log: Path, **extra_env: str) -> subprocess.Popen:
    """Start ``stages/<stage>.py args…`` with its output in ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, str(STAGES / f"{stage}.py"), *args], stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env(**extra_env))


def finish(proc: subprocess.Popen, log: Path, code: int | None = 0, timeout: float = WAIT_S) -> str:
    """Wait for ``proc``; check its exit code (None: any); return its output."""
    rc = proc.wait(timeout=timeout)
    text = log.read_text()
    if code is not None:
        assert rc == code, f"exit {rc}, expected {code}:\n{text[-3000:]}"
    return text


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float = WAIT_S) -> None:
    """Poll ``condition`` while ``proc`` runs; fail if it ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (exit {proc.returncode}) before the moment came:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting")
        time.sleep(POLL_S)


def only_run(runs: Path, stage: str) -> Path:
    """The one run directory of ``stage`` under ``runs``."""
    return (runs / stage / "latest").resolve()


def all_checkpoints_load(ckpt_dir: Path) -> dict[str, int]:
    """Load every ``*.ckpt`` (the weights-only path); name → global step. Fails on any unreadable file."""
    return {p.name: int(load_file(p)["global_step"]) for p in sorted(ckpt_dir.glob("*.ckpt"))}


def assert_same(a, b, where: str = "") -> None:
    """Bit-identical nested checkpoint contents (tensors, numbers, containers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def logged(run: Path, column: str) -> dict[int, str]:
    """``step → value`` (as written) of one metrics.csv column."""
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): r[column] for r in csv.DictReader(f) if r.get(column)}
