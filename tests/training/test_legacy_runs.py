"""Runs written by the code before the package was split into layers still load, sample and resume, as before.

``tests/fixtures/legacy_runs`` holds a VAE run, a class-conditional stage-2 run, a ControlNet run on it and an
exported public-layout file, all made at commit 1343a2e (``make_golden.py`` there says how), and
``golden.safetensors``: what that commit's code sampled from them and the losses it logged when resuming them.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm.data.shapes import ShapesDataset
from ldm.inference.pipeline import Pipeline
from ldm.training.driver import train
from tests.paths import REPO_ROOT

FIXTURE = Path(__file__).parents[1] / "fixtures" / "legacy_runs"
VAE_RUN = "runs/vae/vae-20261129-161237"
LDM_RUN = "runs/ldm/ldm-class-20261129-161331"
CONTROL_RUN = "runs/controlnet/controlnet-20261129-161349"
EXPORTED = "exported/ldm-class.safetensors"
SAMPLING = dict(steps=3, sampler="ddim", guidance=3.0, seed=0)
LABELS = [1, 5]
# The VAE is resumed last: resuming stage 2 after its VAE trained on would encode its cache in another latent space
# (refused). The stage-2 and ControlNet losses were logged by the code of commit 5b25c3c in this order.
RESUME = {"ldm": (LDM_RUN, 8, "train/loss"), "controlnet": (CONTROL_RUN, 5, "train/loss"),
          "vae": (VAE_RUN, 8, "train/rec_loss")}
SAMPLE_ATOL = 1e-4  # fp32 sampling through rewritten (not re-ordered) arithmetic
LOSS_RTOL = 1e-4

pytestmark = pytest.mark.slow


def samples() -> dict[str, torch.Tensor]:
    """Images (N, 3, 16, 16) from the stage-2 run, the ControlNet run (one val hint) and the exported file."""
    hint = ShapesDataset(size=16, length=1, split="val", hint=True)[0]["hint"]  # (3, 16, 16) in [0, 1]
    return {
        "sample/ldm": Pipeline.from_run(LDM_RUN).generate_tensors(LABELS, **SAMPLING),
        "sample/controlnet": Pipeline.from_run(CONTROL_RUN).generate_tensors(LABELS[:1], control=hint, **SAMPLING),
        "sample/exported": Pipeline.from_checkpoint(EXPORTED).generate_tensors(LABELS, **SAMPLING),
    }


def _before_build(stage: str):
    if stage == "ldm":
        from ldm.training.cache import ensure_cache

        return lambda cfg, path: ensure_cache(cfg, path)
    if stage == "controlnet":
        from ldm.training.controlnet_base import prepare_controlnet

        return prepare_controlnet
    return None


def resumed_losses() -> dict[str, torch.Tensor]:
    """Each run resumed from its last checkpoint for two more steps: the training losses it logs (steps ≥ resume)."""
    out = {}
    for stage, (run, max_steps, column) in RESUME.items():
        before = _last_step(run)
        train(stage, str(REPO_ROOT / "configs" / "tiny" / "vae.yaml"),
              ["--resume", run, f"trainer.max_steps={max_steps}"], before_build=_before_build(stage))
        with open(Path(run) / "metrics.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get(column) and int(r["step"]) > before]
        out[f"loss/{stage}"] = torch.tensor([float(r[column]) for r in rows])
    return out


def _last_step(run: str) -> int:
    with open(Path(run) / "metrics.csv", newline="") as f:
        return max(int(r["step"]) for r in csv.DictReader(f))


@pytest.fixture
def legacy(tmp_path, monkeypatch) -> dict[str, torch.Tensor]:
    """A copy of the fixture as the working directory (runs name each other by relative paths); the golden values."""
    shutil.copytree(FIXTURE, tmp_path / "legacy")
    monkeypatch.chdir(tmp_path / "legacy")
    return load_file(FIXTURE / "golden.safetensors")


def test_legacy_runs_sample_as_before(legacy):
    got = samples()
    for key, image in got.items():
        assert image.shape == legacy[key].shape
        torch.testing.assert_close(image, legacy[key], atol=SAMPLE_ATOL, rtol=0, msg=key)
    torch.testing.assert_close(got["sample/exported"], got["sample/ldm"], atol=SAMPLE_ATOL, rtol=0)


def test_legacy_runs_resume_as_before(legacy):
    got = resumed_losses()
    for key, losses in got.items():
        assert len(losses) == 2, key  # two more steps, each logged once
        torch.testing.assert_close(losses, legacy[key], rtol=LOSS_RTOL, atol=0, msg=key)
