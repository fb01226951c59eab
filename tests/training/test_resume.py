"""Kill and resume a real stage-1 run in subprocesses: SIGTERM saves and exits 143, SIGKILL mid-step loses only
the steps since the last checkpoint, and the resumed run ends bit-identical to an uninterrupted one (weights,
optimiser, LR schedule, RNG, data order, logged losses). Stage 2 (with EMA, killed mid-save): test_resume_ldm.py."""

from __future__ import annotations

import signal

import pytest

from ldm.io.checkpoints import load_file
from ldm.io.runs import CHECKPOINT_DIR
from ldm.training.driver import train
from tests.conftest import TINY
from tests.faults import read_probe
from tests.forked import launch_forked
from tests.procs import (
    STAGES,
    all_checkpoints_load,
    assert_same,
    finish,
    logged,
    only_run,
    wait_until,
)

pytestmark = pytest.mark.slow  # subprocesses / compiles / end-to-end: `pytest -m "not slow"` skips them

STEPS = 8
SIGTERM_AT, SIGKILL_AT = 1, 4  # the steps the probed run holds at, for the test to signal it there
COMPARED = ("state_dict", "optimizer_states", "lr_schedulers", "global_step", "ldm_rng_states")


def probed_config(tmp_path, base: str, probe: str, hold_at: tuple[int, ...] = ()) -> str:
    """A config that includes ``base`` and adds a StepProbe writing to ``probe`` (holding at ``hold_at``)."""
    path = tmp_path / f"{probe}.yaml"
    path.write_text(f"base: {TINY / base}\ntrainer: {{max_steps: {STEPS}}}\n"
                    f"callbacks: [{{target: tests.faults.StepProbe, params: {{out: {tmp_path / probe}.jsonl, "
                    f"hold_at: {list(hold_at)}}}}}]\n")
    return str(path)


def batches(records: list[dict]) -> dict[int, list[str]]:
    """step → item paths of the batch trained at that step (a re-run step keeps its latest record)."""
    return {r["step"]: r["paths"] for r in records if r["event"] == "batch"}


def assert_matches_reference(run, ref, tmp_path, loss_column: str) -> None:
    """The resumed run's final checkpoint, data order and loss curve equal the uninterrupted run's."""
    final = load_file(run / CHECKPOINT_DIR / "last.ckpt")
    expected = load_file(ref / CHECKPOINT_DIR / "last.ckpt")
    assert final["global_step"] == STEPS
    for key in COMPARED:
        assert_same(final[key], expected[key], key)
    assert batches(read_probe(tmp_path / "run.jsonl")) == batches(read_probe(tmp_path / "ref.jsonl"))
    assert logged(run, loss_column) == logged(ref, loss_column) and len(logged(ref, loss_column)) == STEPS


def resume_here(stage: str, run, recwarn, capfd) -> None:
    """Finish a stopped run in this process (the killed one was another): neither Lightning's "dataloader is not
    resumable" nor its "checkpoint directory exists and is not empty" warning is raised or printed."""
    train(stage, argv=["--resume", str(run)])
    said = [str(w.message) for w in recwarn] + capfd.readouterr().out.splitlines()
    assert not [line for line in said if "not resumable" in line or "exists and is not empty" in line], said


def reference_run(stage: str, config: str, runs, *overrides: str):
    """The uninterrupted run, trained in this process (only the interrupted one needs a process to kill)."""
    return train(stage, config, ["--cfg", config, "--runs-dir", str(runs), *overrides])


def test_vae_sigterm_then_sigkill_mid_step_resumes_exactly(tmp_path, monkeypatch, recwarn, capfd):
    monkeypatch.setenv("LDM_ALLOW_TARGETS", "tests.")  # the probe callback the configs name
    ref_cfg = probed_config(tmp_path, "vae.yaml", "ref")
    run_cfg = probed_config(tmp_path, "vae.yaml", "run", hold_at=(SIGTERM_AT, SIGKILL_AT))
    log = tmp_path / "run.log"
    proc = launch_forked("train_vae", ["--cfg", run_cfg, "--runs-dir", str(tmp_path / "runs")], log)
    probe = tmp_path / "run.jsonl"

    # SIGTERM during step 1: the step finishes, last.ckpt is written, exit 143 with a resume hint.
    wait_until(lambda: any(r.get("step") == SIGTERM_AT for r in read_probe(probe)), proc, log)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc, log, code=143)
    run = only_run(tmp_path / "runs", "vae")
    command = f"stopped at step 2; resume with: python {STAGES / 'train_vae.py'} --resume {run.absolute()}"
    assert command in out.splitlines()  # an info line (no "warning:"): a complete command, to paste as is
    assert all_checkpoints_load(run / CHECKPOINT_DIR) == {"last.ckpt": 2}

    # Resume, then SIGKILL in step 4: the checkpoint of step 3 is the last good one.
    proc = launch_forked("train_vae", ["--resume", str(run)], log)
    wait_until(lambda: any(r.get("step") == SIGKILL_AT for r in read_probe(probe)), proc, log)
    proc.send_signal(signal.SIGKILL)
    finish(proc, log, code=-signal.SIGKILL)
    assert all_checkpoints_load(run / CHECKPOINT_DIR) == {"last.ckpt": 3, "step0000003.ckpt": 3}

    resume_here("vae", run, recwarn, capfd)  # the data position is restored: no loader warning
    ref = reference_run("vae", ref_cfg, tmp_path / "ref")
    assert_matches_reference(run, ref, tmp_path, "train/rec_loss")
