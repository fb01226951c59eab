"""SDXL's micro-conditioning in training: the sizes of a batch (from a bucketed cache's items, or the defaults of a
square cache without them), and CFG dropout of a conditioner's named outputs (one draw per sample, all outputs)."""

import pytest
import torch

from ldm.systems.sizes import batch_sizes, drop_outputs, target_size

FACTOR = 8


def test_a_bucketed_batch_gives_its_own_original_size_and_crop_and_the_latents_target():
    batch = {"mean": torch.zeros(2, 4, 96, 128), "original_size": torch.tensor([[800, 1200], [1500, 2000]]),
             "crop_top_left": torch.tensor([[0, 32], [17, 0]])}
    sizes = batch_sizes(batch, FACTOR)
    assert sizes["target_size"].tolist() == [[768, 1024]] * 2  # latents (96, 128) × 8
    assert sizes["original_size"].tolist() == [[800, 1200], [1500, 2000]]
    assert sizes["crop_top_left"].tolist() == [[0, 32], [17, 0]]
    assert all(v.dtype == torch.float32 for v in sizes.values())


def test_a_batch_without_sizes_is_uncropped_at_the_target_size():
    sizes = batch_sizes({"latent": torch.zeros(3, 4, 16, 8)}, FACTOR)
    assert sizes["original_size"].tolist() == sizes["target_size"].tolist() == [[128, 64]] * 3
    assert sizes["crop_top_left"].tolist() == [[0, 0]] * 3
    assert target_size({"image": torch.zeros(1, 3, 40, 24)}, FACTOR) == (40, 24)  # pixels already


def test_bad_size_fields_are_refused():
    with pytest.raises(ValueError, match=r"original_size must be \(2, 2\)"):
        batch_sizes({"mean": torch.zeros(2, 4, 8, 8), "original_size": torch.tensor([64, 64])}, FACTOR)
    with pytest.raises(KeyError, match="no latents"):
        batch_sizes({"caption": ["a"]}, FACTOR)


def test_dropout_swaps_every_output_of_a_sample_together():
    n = 64
    cond = {"context": torch.ones(n, 3, 5), "y": torch.ones(n, 7)}
    null = {"context": torch.zeros(n, 3, 5), "y": torch.full((n, 7), 2.0)}
    torch.manual_seed(0)
    out = drop_outputs(cond, null, 0.5)
    dropped = out["context"][:, 0, 0] == 0
    assert 0 < int(dropped.sum()) < n  # some samples dropped, not all
    assert torch.equal(out["y"][dropped], null["y"][dropped]) and torch.equal(out["y"][~dropped], cond["y"][~dropped])
    assert torch.equal(out["context"][~dropped], cond["context"][~dropped])
    assert torch.equal(drop_outputs(cond, null, 1.0)["y"], null["y"])
    assert torch.equal(drop_outputs(cond, null, 0.0)["context"], cond["context"])
