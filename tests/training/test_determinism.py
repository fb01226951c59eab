"""Determinism on CPU: the same seed and config give bit-identical first-N-step losses and weights; another
seed does not (so the comparison can fail)."""

from __future__ import annotations

import pytest
import torch

from ldm.core.config import load_config
from ldm.io.checkpoints import load_file
from ldm.io.runs import CHECKPOINT_DIR
from ldm.training.cache import ensure_cache
from ldm.training.driver import train
from tests.conftest import TINY
from tests.procs import logged

STEPS = 4

pytestmark = pytest.mark.slow  # end-to-end: six trainings through the driver, to disk


@pytest.fixture(scope="module")
def ldm_args(toy_vae_run, workdir):
    """Overrides pointing stage 2 at a latent cache of the session's tiny VAE (built once)."""
    args = [f"cache.vae={toy_vae_run}", f"cache.dir={workdir / 'cache' / 'toy-text'}"]
    ensure_cache(load_config(TINY / "ldm-text.yaml", args))
    return args


def losses_and_weights(stage: str, config: str, runs, column: str, *overrides: str, before_build=None):
    """Train STEPS steps; the logged losses by step and the final state dict."""
    run = train(stage, config, ["--cfg", config, "--runs-dir", str(runs), f"trainer.max_steps={STEPS}", *overrides],
                before_build=before_build)
    return logged(run, column), load_file(run / CHECKPOINT_DIR / "last.ckpt")["state_dict"]


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage", ["vae", "ldm"])
def test_same_seed_same_losses_other_seed_different(stage, tmp_path, ldm_args):
    if stage == "vae":
        config, column, extra, hook = str(TINY / "vae.yaml"), "train/rec_loss", [], None
    else:
        # no sample grid: it would draw after the last step, where it can change no loss or weight compared here
        config, column, extra, hook = str(TINY / "ldm-text.yaml"), "train/loss", [*ldm_args, "callbacks=[]"], ensure_cache
    first, first_state = losses_and_weights(stage, config, tmp_path / "a", column, *extra, before_build=hook)
    again, again_state = losses_and_weights(stage, config, tmp_path / "b", column, *extra, before_build=hook)
    other, other_state = losses_and_weights(stage, config, tmp_path / "c", column, *extra, "seed=1",
                                            before_build=hook)
    assert len(first) == STEPS
    assert first == again and same_state(first_state, again_state)  # bit-identical, as written
    assert first != other and not same_state(first_state, other_state)
