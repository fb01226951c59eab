"""Many processes: tiny stage 2 on two gloo processes (`trainer.strategy=ddp trainer.devices=2`) on a plain (one-size)
cache. One uninterrupted two-process run (shared by the tests here) is compared with one process at twice the batch:
disjoint data shards, identical weights and EMA on both ranks, checkpoints written by rank 0 only, and the same loss
curve within noise. A second two-process run, stopped by SIGTERM mid-epoch and resumed, continues the epoch where it
stopped — every step's two shares are disjoint, and over each epoch every cached item is trained on exactly once —
draws the batches the uninterrupted run draws and ends on its weights."""

from __future__ import annotations

import statistics

import pytest

from ldm.core.config import load_config
from ldm.data.latents import LatentDataset
from ldm.io.checkpoints import load_file
from ldm.io.runs import CHECKPOINT_DIR
from ldm.training.cache import ensure_cache
from ldm.training.driver import train
from tests.aspect_folder import make_aspect_folder
from tests.conftest import TINY
from tests.faults import read_probe
from tests.forked import launch_forked
from tests.procs import finish, logged, only_run
from tests.training.test_bucket_epochs import DDP, probed, sigterm_two_processes, steps_by_rank

pytestmark = pytest.mark.slow  # subprocesses / end-to-end: `pytest -m "not slow"` skips them

CONFIG = TINY / "ldm-buckets.yaml"  # its captioned folder, cropped square (buckets off): items carry their paths
RANK_BATCH = 2
LOSS_TOLERANCE = 0.25  # relative difference of the mean training loss (ε-prediction loss is noisy per batch)


@pytest.fixture(scope="module")
def square_run_args(tiny_vae_run, tmp_path_factory):
    """Overrides for a square cache of 24 captioned training images (an even count: no rank is padded), its paths."""
    folder = make_aspect_folder(tmp_path_factory.mktemp("square") / "square", 27)
    cache = folder.parent / "cache"  # beside its data: a re-run of this fixture builds from its own folder
    args = [f"cache.vae={tiny_vae_run}", f"cache.dir={cache}", f"cache.data.train.params.root={folder}",
            f"cache.data.val.params.root={folder}", "cache.data.train.params.buckets=null",
            "cache.data.val.params.buckets=null"]
    ensure_cache(load_config(CONFIG, args))
    latents = LatentDataset(str(cache), "train")
    paths = [p for record in latents.records for p in record["path"]]
    assert latents.bucket_ids is None and len(paths) % 2 == 0
    return args, paths


def epoch_steps(paths: list[str]) -> int:
    """Steps per epoch (drop_last: false), each rank half the items."""
    return -(-len(paths) // 2 // RANK_BATCH)


@pytest.fixture(scope="module")
def uninterrupted(square_run_args, tmp_path_factory):
    """Two epochs in two gloo processes, probed, without a stop: (its run directory, the probe's records). Its second
    rank is the fresh interpreter Lightning's own launcher starts, as in production (every other multi-process run in
    the tests forks its ranks, tests.forked): the resumed run, whose ranks are forked, must end on its weights."""
    args, paths = square_run_args
    out = tmp_path_factory.mktemp("uninterrupted")
    log = out / "ref.log"
    finish(launch_forked("train_ldm", ["--cfg", str(CONFIG), *args, *DDP, f"data.params.batch_size={RANK_BATCH}",
                                       "--runs-dir", str(out / "runs"),
                                       *probed(out, "ref", 2 * epoch_steps(paths))], log, fresh_ranks=True), log)
    return only_run(out / "runs", "ldm"), read_probe(out / "ref.jsonl")


def test_two_gloo_processes_match_one_with_twice_the_batch(tmp_path, square_run_args, uninterrupted):
    args, paths = square_run_args
    run, records = uninterrupted
    steps = 2 * epoch_steps(paths)
    for step in range(steps):
        shards = [r["paths"] for r in records if r["event"] == "batch" and r["step"] == step]
        assert len(shards) == 2 and all(len(s) == RANK_BATCH for s in shards)
        assert not set(shards[0]) & set(shards[1]), f"step {step}: the ranks share items"
    assert {r["rank"] for r in records if r["event"] == "save"} == {0}
    ends = [r for r in records if r["event"] == "end"]
    assert sorted(r["rank"] for r in ends) == [0, 1]
    assert ends[0]["weights"] == ends[1]["weights"] and ends[0]["ema"] == ends[1]["ema"]

    assert len(list(run.parent.glob("tiny-ldm-buckets-*"))) == 1  # the worker joined rank 0's run
    ckpt = load_file(run / CHECKPOINT_DIR / "last.ckpt")
    assert ckpt["global_step"] == steps and any(k.startswith("model_ema.") for k in ckpt["state_dict"])

    # one process at twice the batch, trained here (only the two-process run needs processes of its own)
    one = train("ldm", str(CONFIG), ["--cfg", str(CONFIG), *args, "--runs-dir", str(tmp_path / "one"), "callbacks=[]",
                                     f"trainer.max_steps={steps}", f"data.params.batch_size={2 * RANK_BATCH}"])
    ddp_loss = [float(v) for v in logged(run, "train/loss").values()]
    one_loss = [float(v) for v in logged(one, "train/loss").values()]
    assert len(ddp_loss) == len(one_loss) == steps
    ddp_mean, one_mean = statistics.mean(ddp_loss), statistics.mean(one_loss)
    print(f"mean train loss: 2 processes × {RANK_BATCH} {ddp_mean:.4f}, 1 process × {2 * RANK_BATCH} {one_mean:.4f}")
    assert abs(ddp_mean - one_mean) < LOSS_TOLERANCE * one_mean


def test_two_processes_resume_a_plain_epoch_exactly(tmp_path, square_run_args, uninterrupted):
    args, paths = square_run_args
    per_epoch = epoch_steps(paths)
    steps = 2 * per_epoch
    run, log, probe = sigterm_two_processes(tmp_path, args, RANK_BATCH, steps)
    finish(launch_forked("train_ldm", ["--resume", str(run)], log), log)

    batches = steps_by_rank(read_probe(probe))
    assert sorted(batches) == [(step, rank) for step in range(steps) for rank in (0, 1)]
    for epoch in range(2):
        seen = []
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            assert not set(batches[(step, 0)]) & set(batches[(step, 1)]), f"step {step}: the ranks share items"
            seen += batches[(step, 0)] + batches[(step, 1)]
        assert sorted(seen) == sorted(paths), f"epoch {epoch}: not every item exactly once"
    assert batches == steps_by_rank(uninterrupted[1])  # the batches of a run without a stop
    assert ends_by_rank(read_probe(probe)) == ends_by_rank(uninterrupted[1])  # its weights and EMA, bit for bit


def ends_by_rank(records: list[dict]) -> dict[int, tuple[str, str]]:
    """rank → (weights hash, EMA hash) the probe recorded at the end of training."""
    return {r["rank"]: (r["weights"], r["ema"]) for r in records if r["event"] == "end"}
