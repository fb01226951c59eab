"""The run's final state reaches ``last.ckpt`` exactly once, whether or not a periodic checkpoint fell on the last
step; at a periodic step ``last.ckpt`` is a hard link to that step's file, not a second copy."""

import os

import lightning.pytorch as L
import pytest
import torch

from ldm.training.driver import train

EVERY_4 = ["checkpoint.every_n_train_steps=4", "callbacks=[{target: tests.training.test_final_checkpoint.CountSaves}]"]
SAVES: list[int] = []  # the step of every checkpoint written, in order (CountSaves appends)


class CountSaves(L.Callback):
    """Note the global step of every checkpoint the trainer writes."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        SAVES.append(trainer.global_step)


def toy_run(toy_cfg, *overrides: str):
    """A run of tests.toy's config (``toy_cfg``; checkpoints every 4 steps, saves counted) in a new runs folder."""
    return train("toy", str(toy_cfg), ["--cfg", str(toy_cfg), "--runs-dir", str(toy_cfg.parent / "runs"), *EVERY_4,
                                       *overrides])


@pytest.mark.parametrize("steps, saves", [(2, [2]), (4, [4, 4]), (6, [4, 4, 6])])  # [4, 4]: step0000004 and last
def test_the_last_step_is_saved_once(toy_cfg, steps, saves):
    SAVES.clear()
    run = toy_run(toy_cfg, f"trainer.max_steps={steps}")
    assert SAVES == saves  # checkpoints Lightning asked for (a linked one counts: its state was gathered)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps


def test_last_is_a_hard_link_to_the_periodic_file_of_its_step_and_outlives_it(toy_cfg):
    SAVES.clear()  # every_n_train_steps 4 (EVERY_4), keep 2 (the config); 10 steps: periodic files at 4 and 8
    run = toy_run(toy_cfg, "trainer.max_steps=10", "checkpoint.keep=1")
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step0000008.ckpt"]  # step 4's removed by keep
    assert not (ckpts / "last.ckpt").is_symlink() and (ckpts / "last.ckpt").stat().st_nlink == 1  # written at 10
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 10
    assert (ckpts / "step0000008.ckpt").stat().st_nlink == 1  # the link to it was replaced by step 10's file

    resumed_to = train("toy", str(toy_cfg), ["--resume", str(run), "trainer.max_steps=12"])
    assert os.path.samefile(resumed_to / "checkpoints" / "last.ckpt", resumed_to / "checkpoints" / "step0000012.ckpt")
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 12


def test_where_links_fail_last_is_written(toy_cfg, monkeypatch):
    def no_links(source, target):
        raise OSError("this filesystem has no hard links")

    monkeypatch.setattr("os.link", no_links)
    run = toy_run(toy_cfg, "trainer.max_steps=4")
    last, periodic = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "step0000004.ckpt"
    assert not os.path.samefile(last, periodic)
    written, linked_to = (torch.load(p, weights_only=True) for p in (last, periodic))
    assert written["global_step"] == linked_to["global_step"] == 4
    assert all(torch.equal(v, linked_to["state_dict"][k]) for k, v in written["state_dict"].items())
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
