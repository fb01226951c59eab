"""How litdata's optimize starts a cache build's workers: forked where that is safe (one torch thread, no CUDA here),
spawned otherwise, the same shards either way, and the process-wide start method left as it was."""

import multiprocessing

import pytest
import torch

from ldm.data.streaming import StreamingLatents, optimize_start_method
from ldm.training.cache import make_cache
from tests.data.test_streaming_cache import streaming_config

ONE_PART = ["cache.shard_size=64", "cache.data.train.params.length=12"]


@pytest.fixture
def threads():
    """Set torch's thread count for one test; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def start_method_kept():
    """The process-wide start method before the test, put back after it."""
    before = multiprocessing.get_start_method(allow_none=True)
    yield before
    multiprocessing.set_start_method(before, force=True)


def test_workers_fork_at_one_thread_spawn_at_more_and_the_start_method_is_put_back(threads, start_method_kept):
    forks = "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized()
    multiprocessing.set_start_method("forkserver" if forks else "spawn", force=True)
    chosen = multiprocessing.get_start_method()
    threads(1)
    with optimize_start_method() as method:
        assert method == ("fork" if forks else None)
        multiprocessing.set_start_method("spawn", force=True)  # what litdata's optimize does
    assert multiprocessing.get_start_method() == chosen
    threads(2)  # a forked child entering a two-thread OpenMP region would hang: litdata's default instead
    with optimize_start_method() as method:
        assert method is None


@pytest.mark.slow  # spawned workers import torch and ldm again (seconds each)
def test_spawned_and_forked_workers_write_the_same_items(tiny_vae_run, tmp_path, threads, start_method_kept):
    items = {}
    for n_threads in (1, 2):
        threads(n_threads)
        cfg = streaming_config(tiny_vae_run, tmp_path / f"threads{n_threads}", *ONE_PART)
        del cfg["cache"]["data"]["val"]  # the compared split alone: one part, one worker started per build
        assert make_cache(cfg, progress=False)["parts"] == {"train": 1}
        assert multiprocessing.get_start_method(allow_none=True) == start_method_kept
        items[n_threads] = {item["index"]: item for item in StreamingLatents(cfg["cache"]["dir"], "train",
                                                                            shuffle=False)}
    assert sorted(items[1]) == sorted(items[2]) == list(range(12))
    for i in items[1]:
        assert torch.equal(items[1][i]["mean"], items[2][i]["mean"]) and items[1][i]["caption"] == items[2][i]["caption"]
