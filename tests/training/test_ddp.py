"""Many processes: tiny stage 2 on two gloo processes (`trainer.strategy=ddp trainer.devices=2`), compared with
one process at twice the batch: disjoint data shards, identical weights and EMA on both ranks, checkpoints
written by rank 0 only, and the same loss curve within noise."""

from __future__ import annotations

import statistics

import pytest

from ldm.core.config import load_config
from ldm.io.checkpoints import load_file
from ldm.io.runs import CHECKPOINT_DIR
from ldm.training.cache import ensure_cache
from tests.conftest import TINY
from tests.faults import read_probe
from tests.procs import finish, launch, logged, only_run

pytestmark = pytest.mark.slow  # subprocesses / compiles / end-to-end: `pytest -m "not slow"` skips them

STEPS = 6
BATCH = 4
LOSS_TOLERANCE = 0.25  # relative difference of the mean training loss (ε-prediction loss is noisy per batch)


@pytest.fixture(scope="module")
def cache_args(toy_vae_run, workdir):
    """Overrides pointing stage 2 at a latent cache of the session's tiny VAE (built once)."""
    args = [f"cache.vae={toy_vae_run}", f"cache.dir={workdir / 'cache' / 'toy-text'}"]
    ensure_cache(load_config(TINY / "ldm-text.yaml", args))
    return args + ["callbacks=[]", f"trainer.max_steps={STEPS}"]


def probe_override(path) -> str:
    return f"callbacks=[{{target: tests.faults.StepProbe, params: {{out: {path}}}}}]"


def test_two_gloo_processes_match_one_with_twice_the_batch(tmp_path, cache_args):
    cfg = str(TINY / "ldm-text.yaml")
    ddp = launch("train_ldm", ["--cfg", cfg, "--runs-dir", str(tmp_path / "ddp"), *cache_args,
                               "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                               f"data.params.batch_size={BATCH}", probe_override(tmp_path / "ddp.jsonl")],
                 tmp_path / "ddp.log")
    one = launch("train_ldm", ["--cfg", cfg, "--runs-dir", str(tmp_path / "one"), *cache_args,
                               f"data.params.batch_size={2 * BATCH}"], tmp_path / "one.log")
    finish(ddp, tmp_path / "ddp.log")
    finish(one, tmp_path / "one.log")

    records = read_probe(tmp_path / "ddp.jsonl")
    for step in range(STEPS):
        shards = [r["paths"] for r in records if r["event"] == "batch" and r["step"] == step]
        assert len(shards) == 2 and all(len(s) == BATCH for s in shards)
        assert not set(shards[0]) & set(shards[1]), f"step {step}: the ranks share items"
    assert {r["rank"] for r in records if r["event"] == "save"} == {0}
    ends = [r for r in records if r["event"] == "end"]
    assert sorted(r["rank"] for r in ends) == [0, 1]
    assert ends[0]["weights"] == ends[1]["weights"] and ends[0]["ema"] == ends[1]["ema"]

    run = only_run(tmp_path / "ddp", "ldm")
    assert len(list((tmp_path / "ddp" / "ldm").glob("tiny-ldm-text-*"))) == 1  # the worker joined rank 0's run
    ckpt = load_file(run / CHECKPOINT_DIR / "last.ckpt")
    assert ckpt["global_step"] == STEPS and any(k.startswith("model_ema.") for k in ckpt["state_dict"])

    ddp_loss = [float(v) for v in logged(run, "train/loss").values()]
    one_loss = [float(v) for v in logged(only_run(tmp_path / "one", "ldm"), "train/loss").values()]
    assert len(ddp_loss) == len(one_loss) == STEPS
    ddp_mean, one_mean = statistics.mean(ddp_loss), statistics.mean(one_loss)
    print(f"mean train loss: 2 processes × {BATCH} {ddp_mean:.4f}, 1 process × {2 * BATCH} {one_mean:.4f}")
    assert abs(ddp_mean - one_mean) < LOSS_TOLERANCE * one_mean
