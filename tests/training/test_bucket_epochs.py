"""Stage 2 on a bucketed cache, interrupted and resumed, in one process and in two gloo processes: every step's batch
holds one bucket (on every rank the same one, different items), and over each epoch every cached item is trained on
exactly once — none twice, none skipped — across SIGTERM, kill -9 and --resume; one process resumed matches an
uninterrupted run batch for batch."""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest

from ldm.core.config import load_config
from ldm.data.latents import LatentDataset
from ldm.io.runs import CHECKPOINT_DIR
from ldm.training.cache import ensure_cache
from ldm.training.driver import train
from tests.aspect_folder import make_aspect_folder
from tests.conftest import TINY
from tests.faults import read_probe
from tests.forked import launch_forked
from tests.procs import all_checkpoints_load, finish, only_run, wait_until

pytestmark = pytest.mark.slow  # subprocesses / compiles / end-to-end: `pytest -m "not slow"` skips them

CONFIG = TINY / "ldm-buckets.yaml"
BATCH = 4  # items per step, over all ranks
SIGTERM_AT = 2  # mid-epoch 0
DDP = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def bucket_run_args(tiny_vae_run, tmp_path_factory):
    folder = make_aspect_folder(tmp_path_factory.mktemp("mixed") / "mixed", 30)
    cache = folder.parent / "cache"  # beside its data: a re-run of this fixture builds from its own folder
    args = [f"cache.vae={tiny_vae_run}", f"cache.dir={cache}", f"cache.data.train.params.root={folder}",
            f"cache.data.val.params.root={folder}"]
    ensure_cache(load_config(CONFIG, args))
    latents = LatentDataset(str(cache), "train")
    bucket_of = {latents.records[s]["path"][r]: latents.bucket_ids[latents.offsets[s] + r]
                 for s in range(len(latents.shards)) for r in range(latents.offsets[s + 1] - latents.offsets[s])}
    return args, bucket_of


def probed(tmp_path, name: str, steps: int, hold_at: tuple[int, ...] = ()) -> list[str]:
    """Overrides: a StepProbe writing ``name``.jsonl (holding at the steps ``hold_at`` for the test's signal, see
    StepProbe), ``steps`` steps, a checkpoint every 3."""
    probe = (f"callbacks=[{{target: tests.faults.StepProbe, params: {{out: {tmp_path / name}.jsonl, "
             f"hold_at: {list(hold_at)}}}}}]")
    return [probe, f"trainer.max_steps={steps}", "checkpoint.every_n_train_steps=3", "trainer.val_check_interval=100"]


def reached(probe, step: int, world: int = 1):
    """A condition for ``wait_until``: every rank has recorded its batch of ``step`` (so each stands held in the
    probe, none inside a collective that would wait for a rank the signal has not reached yet)."""
    return lambda: len({r["rank"] for r in read_probe(probe) if r["event"] == "batch" and r["step"] == step}) == world


def sigterm_two_processes(tmp_path, args: list[str], batch: int, steps: int,
                          hold_at: tuple[int, ...] = ()) -> tuple[Path, Path, Path]:
    """Start a two-process run of ``steps`` held at SIGTERM_AT (and ``hold_at``), stop it there with SIGTERM
    (exit 143); (its run folder, its log, its probe)."""
    log, probe = tmp_path / "ddp.log", tmp_path / "ddp.jsonl"
    proc = launch_forked("train_ldm", ["--cfg", str(CONFIG), *args, *DDP, f"data.params.batch_size={batch}",
                                       "--runs-dir", str(tmp_path / "runs"),
                                       *probed(tmp_path, "ddp", steps, hold_at=(SIGTERM_AT, *hold_at))], log)
    wait_until(reached(probe, SIGTERM_AT, world=2), proc, log)  # mid-epoch 0
    proc.send_signal(signal.SIGTERM)
    finish(proc, log, code=143)
    return only_run(tmp_path / "runs", "ldm"), log, probe


def steps_by_rank(records: list[dict]) -> dict[tuple[int, int], list[str]]:
    """(step, rank) → the paths trained; a step run again after a kill keeps its latest record."""
    return {(r["step"], r["rank"]): r["paths"] for r in records if r["event"] == "batch"}


def assert_epochs_exact(batches: dict[tuple[int, int], list[str]], bucket_of: dict[str, int], world: int,
                        per_epoch: int, epochs: int) -> None:
    """Each step: one bucket on every rank, different items; each epoch: every item exactly once."""
    for epoch in range(epochs):
        seen = []
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            shares = [batches[(step, rank)] for rank in range(world)]
            assert all(shares), f"step {step}: a rank drew no items"
            assert len({bucket_of[p] for share in shares for p in share}) == 1, f"step {step} mixes buckets"
            seen += [p for share in shares for p in share]
        assert sorted(seen) == sorted(bucket_of), f"epoch {epoch}: not every item exactly once"


def epoch_length(bucket_of: dict[str, int]) -> int:
    """Steps per epoch at BATCH items per step (drop_last: false: each bucket's remainder is one more batch)."""
    counts = [list(bucket_of.values()).count(b) for b in set(bucket_of.values())]
    return sum(-(-n // BATCH) for n in counts)


def test_one_process_sigterm_and_kill9_resume_each_epoch_exactly(tmp_path, bucket_run_args, monkeypatch):
    args, bucket_of = bucket_run_args
    per_epoch = epoch_length(bucket_of)
    steps = 2 * per_epoch
    kill_at = per_epoch + 2  # mid-epoch 1, after the checkpoint of step 3k ≤ kill_at
    common = ["--cfg", str(CONFIG), *args, f"data.params.batch_size={BATCH}"]
    log, probe = tmp_path / "run.log", tmp_path / "run.jsonl"
    proc = launch_forked("train_ldm", [*common, "--runs-dir", str(tmp_path / "runs"),
                                       *probed(tmp_path, "run", steps, hold_at=(SIGTERM_AT, kill_at))], log)
    wait_until(reached(probe, SIGTERM_AT), proc, log)
    proc.send_signal(signal.SIGTERM)
    finish(proc, log, code=143)
    run = only_run(tmp_path / "runs", "ldm")
    proc = launch_forked("train_ldm", ["--resume", str(run)], log)
    wait_until(reached(probe, kill_at), proc, log)
    proc.send_signal(signal.SIGKILL)
    finish(proc, log, code=-signal.SIGKILL)
    assert max(all_checkpoints_load(run / CHECKPOINT_DIR).values()) < kill_at  # some steps are trained again
    finish(launch_forked("train_ldm", ["--resume", str(run)], log), log)
    monkeypatch.setenv("LDM_ALLOW_TARGETS", "tests.")  # the probe callback, in this process
    train("ldm", str(CONFIG), [*common, "--runs-dir", str(tmp_path / "ref"), *probed(tmp_path, "ref", steps)])
    # (the uninterrupted reference: trained here, only the interrupted run needs a process to kill)

    resumed = steps_by_rank(read_probe(probe))
    assert_epochs_exact(resumed, bucket_of, 1, per_epoch, 2)
    assert resumed == steps_by_rank(read_probe(tmp_path / "ref.jsonl"))  # the same batches as without a stop


def kill_tree(proc) -> None:
    """SIGKILL a launched run and the rank processes it started (by their ids)."""
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    for child in children:
        child.kill()


def test_two_processes_sigterm_and_kill9_resume_each_epoch_exactly(tmp_path, bucket_run_args):
    args, bucket_of = bucket_run_args
    per_epoch = epoch_length(bucket_of)
    steps = 2 * per_epoch
    kill_at = per_epoch + 2
    run, log, probe = sigterm_two_processes(tmp_path, args, BATCH // 2, steps, hold_at=(kill_at,))
    proc = launch_forked("train_ldm", ["--resume", str(run)], log)
    wait_until(reached(probe, kill_at, world=2), proc, log)
    kill_tree(proc)
    finish(proc, log, code=-signal.SIGKILL)
    assert max(all_checkpoints_load(run / CHECKPOINT_DIR).values()) < kill_at  # some steps are trained again
    finish(launch_forked("train_ldm", ["--resume", str(run)], log), log)

    batches = steps_by_rank(read_probe(probe))
    assert {rank for _, rank in batches} == {0, 1}
    assert_epochs_exact(batches, bucket_of, 2, per_epoch, 2)
