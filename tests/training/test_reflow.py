"""Reflow: (noise, latent) pairs drawn by a flow run are deterministic, resumable and refused when drawn otherwise;
the reflow stage starts from the source's EMA weights and trains on the pairs; straightness is measured."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ldm.core.config import load_config
from ldm.data.latents import CacheError, LatentDataset
from ldm.eval.straightness import straightness
from ldm.inference.loaders import build_system, describe_run
from ldm.inference.pipeline import Pipeline
from ldm.inference.sd_base import load_run_system
from ldm.training.driver import train
from ldm.training.reflow import complete_reflow, ensure_pairs, load_source_weights
from tests.conftest import TINY

pytestmark = pytest.mark.slow
CFG = TINY / "ldm-reflow.yaml"


def config(flow_run, pairs, *extra):
    cfg = load_config(CFG, [f"reflow.source={flow_run}", f"reflow.dir={pairs}", *extra])
    complete_reflow(cfg)
    return cfg


def tensors(pairs):
    return {p.relative_to(pairs).as_posix(): load_file(p) for p in sorted(pairs.glob("*/shard-*.safetensors"))}


def test_pairs_are_deterministic_resumable_and_refused_when_drawn_otherwise(toy_flow_run, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    meta = ensure_pairs(config(toy_flow_run, first))
    assert meta["count"] == 16 + 8 and meta["sampler"] == "euler" and meta["guidance"] == 2.0
    ensure_pairs(config(toy_flow_run, second))
    a, b = tensors(first), tensors(second)
    assert a.keys() == {"train/shard-00000.safetensors", "train/shard-00001.safetensors", "val/shard-00000.safetensors"}
    assert all(torch.equal(a[k][t], b[k][t]) for k in a for t in ("noise", "latent"))
    # the pairs are the source's own samples: Euler from each noise lands on each latent
    pipe = Pipeline.from_run(toy_flow_run, device="cpu")
    item = LatentDataset(str(first), "train")[3]
    again = pipe.latents_for([item["caption"]], item["noise"][None], steps=2, guidance=2.0, sampler="euler")
    # (drawn in a batch of the reflow settings' size there, alone here: fp32 sums in another order)
    torch.testing.assert_close(again[0], item["latent"], atol=2e-4, rtol=1e-4)
    # an interrupted draw resumes: a missing shard is drawn again, the same
    (second / "train" / "shard-00001.json").unlink()
    (second / "meta.json").unlink()
    ensure_pairs(config(toy_flow_run, second))
    assert torch.equal(tensors(second)["train/shard-00001.safetensors"]["latent"],
                       a["train/shard-00001.safetensors"]["latent"])
    with pytest.raises(CacheError, match="drawn otherwise"):
        ensure_pairs(config(toy_flow_run, first, "reflow.guidance=3.0"))


def test_the_reflow_stage_starts_from_the_source_and_trains_on_the_pairs(toy_flow_run, tmp_path):
    cfg = config(toy_flow_run, tmp_path / "pairs")
    system = build_system(cfg["model"])
    load_source_weights(system, cfg)
    source, _ = load_run_system(describe_run(toy_flow_run))  # its EMA weights in the U-Net
    ours, theirs = system.model.state_dict(), source.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    run = train("reflow", str(CFG), ["--cfg", str(CFG), "--runs-dir", str(tmp_path / "runs"),
                                     f"reflow.source={toy_flow_run}", f"reflow.dir={tmp_path / 'pairs'}"])
    saved = load_config(run / "config.yaml")
    pinned = toy_flow_run.resolve() / "checkpoints" / "last.ckpt"  # the exact checkpoint it started from
    assert saved["reflow"]["source"] == str(pinned) and "unet" in saved["model"]["params"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    pipe = Pipeline.from_run(run, device="cpu")
    s = straightness(pipe, ["a red circle on a blue background"] * 2, steps=4, guidance=1.0, seed=0, batch_size=2)
    assert s > 0 and torch.isfinite(torch.tensor(s))
    train("reflow", str(CFG), ["--resume", str(run), "trainer.max_steps=6"])  # pairs checked, not redrawn
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
