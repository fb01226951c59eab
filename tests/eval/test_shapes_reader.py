"""The analytic shapes reader: right on real samples, near chance on shuffled factors, never crashes."""

import numpy as np
import pytest
import torch

from ldm.data.shapes import COLORS, SHAPES, ShapesDataset, render
from ldm.eval.shapes_reader import adherence, read_factors


def _samples(size: int, n: int, split: str = "val"):
    ds = ShapesDataset(size=size, length=n, split=split, seed=7)
    return [ds.render(i) for i in range(n)], [ds.factors(i) for i in range(n)]


@pytest.mark.parametrize("size,n", [(32, 400), (64, 120)])
def test_reads_real_samples(size, n):
    images, factors = _samples(size, n)
    result = adherence(images, factors)
    assert result["n"] == n
    assert result["all"] >= 0.99, result
    assert min(result["shape"], result["color"], result["background"]) >= 0.99


def test_shuffled_factors_score_near_zero():
    images, factors = _samples(32, 300)
    perm = np.random.default_rng(0).permutation(len(factors))
    assert adherence(images, [factors[j] for j in perm])["all"] < 0.05


def test_robust_to_noise_and_accepts_tensors_and_arrays():
    images, factors = _samples(32, 100, split="test")
    gen = torch.Generator().manual_seed(0)
    clean = [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images]  # (3, H, W)
    noisy = [x + 0.2 * torch.randn(x.shape, generator=gen) for x in clean]
    assert adherence(noisy, factors)["all"] >= 0.97
    assert read_factors(np.asarray(images[0])) == factors[0]


def test_each_kind_in_every_corner():
    for shape in SHAPES:
        for center in [(10.0, 10.0), (22.0, 10.0), (16.0, 22.0)]:
            image = render(shape, "yellow", "blue", 32, center, 7.0)
            assert read_factors(image) == {"shape": shape, "color": "yellow", "background": "blue"}


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((32, 32, 3), np.uint8),
        np.full((32, 32, 3), 255, np.uint8),
        np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8),
        np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8),
        np.full((16, 16), 100, np.uint8),
    ],
)
def test_odd_inputs_give_a_valid_guess(image):
    got = read_factors(image)
    assert got["shape"] in SHAPES and got["color"] in COLORS and got["background"] in COLORS
    assert got["color"] != got["background"]
