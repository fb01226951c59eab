"""Run directories: ``runs/<stage>/<name>-<time>/`` with config, checkpoints, samples and metrics."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from ldm.core.config import load_config
from ldm.core.errors import UserError

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
SAMPLES_DIR = "samples"
LAST_CHECKPOINT = "last.ckpt"
PERIODIC_CHECKPOINT = "step{step:07d}"  # ModelCheckpoint's filename (``.ckpt`` added): step0000500.ckpt
PERIODIC_CHECKPOINT_NAME = re.compile(r"step\d{7}\.ckpt")
LATEST_LINK = "latest"
RUNS_ROOT_ENV = "LDM_RUNS_DIR"
DEFAULT_RUNS_ROOT = "runs"
# Refuse to start a run with less free disk than this: a checkpoint must fit next to the last good one.
MIN_FREE_BYTES = 256 * 2**20


class RunError(UserError, RuntimeError):
    """A run directory or checkpoint that cannot be found, read or written."""


def runs_root() -> Path:
    """The folder holding all runs (``$LDM_RUNS_DIR`` or ``runs``)."""
    return Path(os.environ.get(RUNS_ROOT_ENV, DEFAULT_RUNS_ROOT))


def create_run_dir(stage: str, name: str, root: str | os.PathLike | None = None) -> Path:
    """Make ``<root>/<stage>/<name>-<time>/`` with its sub-folders and point ``<stage>/latest`` at it."""
    stage_dir = Path(root if root is not None else runs_root()) / stage
    check_writable(stage_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = stage_dir / f"{name}-{stamp}"
    suffix = 1
    while run.exists():
        suffix += 1
        run = stage_dir / f"{name}-{stamp}-{suffix}"
    for sub in (CHECKPOINT_DIR, SAMPLES_DIR):
        (run / sub).mkdir(parents=True)
    point_latest(run)
    return run


def point_latest(run: Path) -> None:
    """Atomically repoint ``<stage>/latest`` at ``run`` (a relative symlink)."""
    link = run.parent / LATEST_LINK
    tmp = run.parent / f".{LATEST_LINK}.tmp{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run.name, target_is_directory=True)
    os.replace(tmp, link)


def check_writable(directory: Path, min_free_bytes: int = MIN_FREE_BYTES) -> None:
    """Fail early, with a clear message, if a run cannot be written to ``directory``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to {directory}: {e.strerror or e}. Choose another folder "
                       f"(--runs-dir or ${RUNS_ROOT_ENV}) or fix its permissions.") from e
    free = shutil.disk_usage(directory).free
    if free < min_free_bytes:
        raise RunError(f"only {free / 2**20:.0f} MiB free on the disk holding {directory}; "
                       f"at least {min_free_bytes / 2**20:.0f} MiB are needed for checkpoints.")


def resolve_run(spec: str | os.PathLike) -> Path:
    """A run directory from a path to it, to ``<stage>/latest``, or to a checkpoint inside it."""
    path = Path(spec)
    if not path.exists():
        hint = " (no run of that stage has been started yet?)" if path.name == LATEST_LINK else ""
        raise RunError(f"run not found: {spec}{hint}")
    path = path.resolve()
    if path.is_file():
        path = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
    if not (path / CONFIG_FILE).is_file():
        raise RunError(f"{spec} is not a run directory: it has no {CONFIG_FILE}")
    return path


def run_config(run: str | os.PathLike) -> dict:
    """The resolved config a run was started with."""
    return load_config(resolve_run(run) / CONFIG_FILE)


def last_checkpoint(run: str | os.PathLike) -> Path:
    """The checkpoint to resume from: ``last.ckpt``, else the newest periodic one."""
    ckpt_dir = resolve_run(run) / CHECKPOINT_DIR
    last = ckpt_dir / LAST_CHECKPOINT
    if last.is_file():
        return last
    periodic = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not periodic:
        raise RunError(f"{run} has no checkpoint yet in {ckpt_dir}")
    return periodic[-1]


def checkpoint_for(spec: str | os.PathLike) -> Path:
    """A checkpoint file named directly, or the last checkpoint of a named run."""
    path = Path(spec)
    if path.is_file() and path.suffix in {".ckpt", ".pt", ".pth", ".safetensors"}:
        return path
    return last_checkpoint(spec)
