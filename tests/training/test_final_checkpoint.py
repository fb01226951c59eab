"""The run's final state reaches ``last.ckpt`` exactly once, whether or not a periodic checkpoint fell on the last step."""

import pytest
import torch
import lightning.pytorch as L

from ldm.training.driver import train

TOY_CONFIG = """
name: toy
seed: 0
model: {target: tests.toy.ToyRegression, params: {learning_rate: 0.1}}
data: {target: tests.toy.ToyData, params: {n: 64, batch_size: 8}}
trainer: {max_steps: 6, accelerator: cpu, devices: 1, enable_model_summary: false, log_every_n_steps: 1, enable_progress_bar: false}
checkpoint: {every_n_train_steps: 4, keep: 2}
callbacks: [{target: tests.training.test_final_checkpoint.CountSaves}]
"""
SAVES: list[int] = []  # the step of every checkpoint written, in order (CountSaves appends)


class CountSaves(L.Callback):
    """Note the global step of every checkpoint the trainer writes."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        SAVES.append(trainer.global_step)


@pytest.mark.parametrize("steps, saves", [(2, [2]), (4, [4, 4]), (6, [4, 4, 6])])  # [4, 4]: step0000004 and last
def test_the_last_step_is_saved_once(tmp_path, monkeypatch, steps, saves):
    monkeypatch.setenv("LDM_ALLOW_TARGETS", "tests.")
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(TOY_CONFIG)
    SAVES.clear()
    run = train("toy", str(cfg), ["--cfg", str(cfg), "--runs-dir", str(tmp_path / "runs"), f"trainer.max_steps={steps}"])
    assert SAVES == saves
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps
