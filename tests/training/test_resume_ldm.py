"""Stage 2 killed with SIGKILL while a checkpoint is being written: every checkpoint file stays loadable, the
killed writer's temporary is cleaned up, and the resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import signal

import pytest

from ldm.core.config import load_config
from ldm.io.checkpoints import load_file
from ldm.io.runs import CHECKPOINT_DIR
from ldm.training.cache import ensure_cache
from tests.conftest import TINY
from tests.forked import launch_forked
from tests.procs import all_checkpoints_load, finish, only_run, slow_checkpoint_renames, wait_until
from tests.training.test_resume import assert_matches_reference, probed_config, reference_run, resume_here

pytestmark = pytest.mark.slow  # subprocesses / compiles / end-to-end: `pytest -m "not slow"` skips them

SAVE_DELAY_S = 1.0  # the window, between writing a checkpoint's temporary file and renaming it, to kill in


@pytest.fixture(scope="module")
def cache_args(toy_vae_run, workdir):
    """Overrides pointing stage 2 at a latent cache of the session's tiny VAE (built once)."""
    args = [f"cache.vae={toy_vae_run}", f"cache.dir={workdir / 'cache' / 'toy-text'}"]
    ensure_cache(load_config(TINY / "ldm-text.yaml", args))
    return args + ["callbacks=[]"]


def test_ldm_sigkill_while_writing_a_checkpoint_resumes_exactly(tmp_path, cache_args, monkeypatch, recwarn, capfd):
    monkeypatch.setenv("LDM_ALLOW_TARGETS", "tests.")  # the probe callback the configs name
    ref_cfg = probed_config(tmp_path, "ldm-text.yaml", "ref")
    run_cfg = probed_config(tmp_path, "ldm-text.yaml", "run")
    log = tmp_path / "run.log"
    proc = launch_forked("train_ldm", ["--cfg", run_cfg, "--runs-dir", str(tmp_path / "runs"), *cache_args], log,
                         before=lambda: slow_checkpoint_renames(SAVE_DELAY_S))

    # Kill while step 6's checkpoint sits complete-but-unrenamed in its temporary file.
    def writing_step6() -> bool:
        runs = list((tmp_path / "runs" / "ldm").glob(f"*/{CHECKPOINT_DIR}/.step0000006.ckpt.tmp*"))
        return bool(runs)

    wait_until(writing_step6, proc, log)
    proc.send_signal(signal.SIGKILL)
    finish(proc, log, code=-signal.SIGKILL)
    run = only_run(tmp_path / "runs", "ldm")
    assert all_checkpoints_load(run / CHECKPOINT_DIR) == {"last.ckpt": 3, "step0000003.ckpt": 3}

    resume_here("ldm", run, recwarn, capfd)
    assert not list((run / CHECKPOINT_DIR).glob(".*"))  # the killed writer's temporary is cleaned up
    ref = reference_run("ldm", ref_cfg, tmp_path / "ref", *cache_args)
    assert_matches_reference(run, ref, tmp_path, "train/loss")
    state = load_file(run / CHECKPOINT_DIR / "last.ckpt")["state_dict"]
    assert any(k.startswith("model_ema.") for k in state)  # the compared weights include the EMA