"""Stage 2 on a bucketed litdata cache (local mode) in two gloo processes, stopped by SIGTERM mid-epoch and
resumed: every step's batch holds one bucket (on both ranks the same one, different items), and over each epoch every
cached item is trained on exactly once — the guarantees of the bucketed folder cache, from streamed shards."""

from __future__ import annotations

import pytest

from ldm.core.config import load_config
from ldm.data.streaming_buckets import StreamingBucketLatents
from ldm.training.cache import ensure_cache
from tests.aspect_folder import make_aspect_folder
from tests.conftest import TINY
from tests.faults import read_probe
from tests.forked import launch_forked
from tests.procs import finish
from tests.training.test_bucket_epochs import (
    BATCH,
    assert_epochs_exact,
    epoch_length,
    sigterm_two_processes,
    steps_by_rank,
)

pytestmark = pytest.mark.slow  # subprocesses / end-to-end: `pytest -m "not slow"` skips them

CONFIG = TINY / "ldm-buckets.yaml"


@pytest.fixture(scope="module")
def streamed_run_args(tiny_vae_run, tmp_path_factory):
    """Overrides for a bucketed litdata cache of 30 mixed-aspect images, and each training item's bucket by path."""
    folder = make_aspect_folder(tmp_path_factory.mktemp("mixed") / "mixed", 30)
    cache = folder.parent / "cache"  # beside its data: a re-run of this fixture builds from its own folder
    args = [f"cache.vae={tiny_vae_run}", f"cache.dir={cache}", f"cache.data.train.params.root={folder}",
            f"cache.data.val.params.root={folder}", "cache.format=litdata", "cache.chunk_bytes=4KB",
            "cache.num_workers=1"]
    ensure_cache(load_config(CONFIG, args))
    latents = StreamingBucketLatents(str(cache), "train")
    bucket_of = {latents[i]["path"]: bucket for i, bucket in enumerate(latents.bucket_ids)}
    assert len(bucket_of) == len(latents) and len(set(bucket_of.values())) == 3
    return args, bucket_of


def test_two_processes_resume_a_streamed_bucket_epoch_exactly(tmp_path, streamed_run_args):
    args, bucket_of = streamed_run_args
    per_epoch = epoch_length(bucket_of)
    steps = 2 * per_epoch
    run, log, probe = sigterm_two_processes(tmp_path, args, BATCH // 2, steps)
    assert "StreamingBucketLatents" in (run / "config.yaml").read_text()
    finish(launch_forked("train_ldm", ["--resume", str(run)], log), log)

    batches = steps_by_rank(read_probe(probe))
    assert {rank for _, rank in batches} == {0, 1}
    assert_epochs_exact(batches, bucket_of, 2, per_epoch, 2)
