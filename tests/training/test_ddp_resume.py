"""Stage 2 on a plain (one-size) cache in two gloo processes, stopped by SIGTERM mid-epoch and resumed: the resumed
ranks continue the epoch where they stopped — every step's two shares are disjoint, and over each epoch every cached
item is trained on exactly once — and the whole run draws the batches an uninterrupted two-process run draws."""

from __future__ import annotations

import signal

import pytest

from ldm.core.config import load_config
from ldm.data.latents import LatentDataset
from ldm.training.cache import ensure_cache
from tests.aspect_folder import make_aspect_folder
from tests.conftest import TINY
from tests.faults import read_probe
from tests.procs import finish, launch, only_run, wait_until
from tests.training.test_bucket_epochs import probed, steps_by_rank

pytestmark = pytest.mark.slow  # subprocesses / end-to-end: `pytest -m "not slow"` skips them

CONFIG = TINY / "ldm-buckets.yaml"  # its captioned folder, cropped square (buckets off): items carry their paths
RANK_BATCH = 2
STEP_SLEEP_S = 0.3
DDP = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def square_run_args(tiny_vae_run, workdir, tmp_path_factory):
    """Overrides for a square cache of 24 captioned training images (an even count: no rank is padded), its paths."""
    folder = make_aspect_folder(tmp_path_factory.mktemp("square") / "square", 27)
    cache = workdir / "cache" / "tiny-square-ddp"
    args = [f"cache.vae={tiny_vae_run}", f"cache.dir={cache}", f"cache.data.train.params.root={folder}",
            f"cache.data.val.params.root={folder}", "cache.data.train.params.buckets=null",
            "cache.data.val.params.buckets=null", f"data.params.batch_size={RANK_BATCH}"]
    ensure_cache(load_config(CONFIG, args))
    latents = LatentDataset(str(cache), "train")
    paths = [p for record in latents.records for p in record["path"]]
    assert latents.bucket_ids is None and len(paths) % 2 == 0
    return args, paths


def test_two_processes_resume_a_plain_epoch_exactly(tmp_path, square_run_args):
    args, paths = square_run_args
    per_epoch = -(-len(paths) // 2 // RANK_BATCH)  # steps per epoch (drop_last: false), each rank half the items
    steps = 2 * per_epoch
    common = ["--cfg", str(CONFIG), *args, *DDP]
    ref = launch("train_ldm", [*common, "--runs-dir", str(tmp_path / "ref"), *probed(tmp_path, "ref", steps, 0.0)],
                 tmp_path / "ref.log")
    finish(ref, tmp_path / "ref.log")
    log, probe = tmp_path / "ddp.log", tmp_path / "ddp.jsonl"
    proc = launch("train_ldm", [*common, "--runs-dir", str(tmp_path / "runs"),
                                *probed(tmp_path, "ddp", steps, STEP_SLEEP_S)], log)
    wait_until(lambda: any(r.get("step") == 2 for r in read_probe(probe)), proc, log)  # mid-epoch 0
    proc.send_signal(signal.SIGTERM)
    finish(proc, log, code=143)
    finish(launch("train_ldm", ["--resume", str(only_run(tmp_path / "runs", "ldm"))], log), log)

    batches = steps_by_rank(read_probe(probe))
    assert sorted(batches) == [(step, rank) for step in range(steps) for rank in (0, 1)]
    for epoch in range(2):
        seen = []
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            assert not set(batches[(step, 0)]) & set(batches[(step, 1)]), f"step {step}: the ranks share items"
            seen += batches[(step, 0)] + batches[(step, 1)]
        assert sorted(seen) == sorted(paths), f"epoch {epoch}: not every item exactly once"
    assert batches == steps_by_rank(read_probe(tmp_path / "ref.jsonl"))  # the batches of a run without a stop
