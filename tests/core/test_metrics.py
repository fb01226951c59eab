"""Image metrics against scikit-image and known values; tolerant edge F1; edge scores on real shapes images."""

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldm.core.metrics import edge_f1, edge_precision_recall_f1, psnr, ssim
from ldm.data.edges import canny, edge_hint
from ldm.data.shapes import ShapesDataset
from ldm.eval.lpips import lpips_distance, lpips_unavailable_reason
from ldm.eval.measures import edge_scores


def _unit_hwc(x: torch.Tensor) -> np.ndarray:
    return ((x.double() + 1) / 2).permute(0, 2, 3, 1).numpy()


@pytest.fixture
def pair():
    """Real shapes images and a noisy, blurred copy: structured content, not just noise."""
    ds = ShapesDataset(size=32, length=4, split="val")
    x = torch.stack([ds[i]["image"] for i in range(4)])
    g = torch.Generator().manual_seed(0)
    y = torch.nn.functional.avg_pool2d(x, 3, 1, 1) + 0.1 * torch.randn(x.shape, generator=g)
    return x, y.clamp(-1, 1)


def test_psnr_matches_skimage_and_known_value(pair):
    x, y = pair
    a, b = _unit_hwc(x), _unit_hwc(y)
    expected = [peak_signal_noise_ratio(a[i], b[i], data_range=1.0) for i in range(len(a))]
    assert psnr(x, y).shape == (4,)
    assert torch.allclose(psnr(x, y), torch.tensor(expected, dtype=torch.float32), atol=1e-4)
    grey = torch.zeros(1, 3, 8, 8)
    assert psnr(grey, grey + 0.2).item() == pytest.approx(20.0, abs=1e-4)  # 0.1 in [0, 1] → 20 dB
    assert torch.isinf(psnr(grey, grey)).all()


def test_ssim_matches_skimage(pair):
    x, y = pair
    a, b = _unit_hwc(x), _unit_hwc(y)
    expected = [
        structural_similarity(a[i], b[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                              data_range=1.0, channel_axis=-1)
        for i in range(len(a))
    ]
    got = ssim(x, y)
    assert got.shape == (4,)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    assert 0.2 < got.min() and got.max() < 0.95  # a real degradation, far from both ends
    assert torch.allclose(ssim(x, x), torch.ones(4))


def test_ssim_non_square_and_too_small():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 13, 20, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    a, b = _unit_hwc(x), _unit_hwc(y)
    expected = structural_similarity(a[1], b[1], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=1.0, channel_axis=-1)
    assert ssim(x, y)[1].item() == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


def test_lpips_distance_or_clear_reason(pair):
    x, y = pair
    distance = lpips_distance(x, y)
    reason = lpips_unavailable_reason()
    if distance is None:  # this machine is offline without the VGG16 file
        assert reason is not None and "vgg16-397923af.pth" in reason and "\n" not in reason
    else:
        assert reason is None and distance.shape == (4,) and (distance > 0).all()
        assert lpips_distance(x, x).abs().max() < 1e-5


def _line(size=16, col=8):
    edges = np.zeros((size, size), np.uint8)
    edges[2:14, col] = 255
    return edges


def test_edge_f1_tolerance():
    hint = _line(col=8)
    assert edge_f1(hint, hint).item() == 1.0
    one_off = _line(col=9)
    assert edge_f1(hint, one_off).item() == 1.0  # within the 1-pixel tolerance
    assert edge_f1(hint, one_off, tolerance=0).item() == 0.0
    assert edge_f1(hint, _line(col=10)).item() == 0.0
    assert edge_f1(hint, _line(col=10), tolerance=2).item() == 1.0
    diagonal = np.zeros((16, 16), np.uint8)
    diagonal[1, 9] = 1  # diagonal neighbour of the line's end (2, 8): chessboard distance 1 counts
    assert edge_precision_recall_f1(hint, diagonal)[0].item() == 1.0
    assert edge_precision_recall_f1(hint, diagonal, tolerance=0)[0].item() == 0.0


def test_edge_precision_recall_partial_and_empty():
    hint = _line(col=8)  # 12 pixels
    generated = _line(col=8)
    generated[:, 12] = 255  # 16 extra pixels far away: precision 12/28, recall 1
    p, r, f = edge_precision_recall_f1(hint, generated)
    assert p.item() == pytest.approx(12 / 28) and r.item() == 1.0
    assert f.item() == pytest.approx(2 * p.item() / (p.item() + 1))
    half = np.zeros_like(hint)
    half[2:8, 8] = 255  # draws half the hint: precision 1, recall 7/12 (row 8 is within tolerance)
    p, r, _ = edge_precision_recall_f1(hint, half)
    assert p.item() == 1.0 and r.item() == pytest.approx(7 / 12)
    empty = np.zeros_like(hint)
    assert edge_f1(empty, empty).item() == 1.0  # nothing asked, nothing drawn
    assert edge_f1(hint, empty).item() == 0.0
    assert edge_f1(empty, hint).item() == 0.0


def test_edge_f1_batched_and_tensor_inputs():
    hints = torch.from_numpy(np.stack([_line(col=8), _line(col=8)]))
    generated = torch.from_numpy(np.stack([_line(col=9), _line(col=12)])).bool()
    scores = edge_f1(hints, generated)
    assert scores.shape == (2,) and scores.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="differ in shape"):
        edge_f1(_line(16), _line(17))


def test_edge_scores_on_real_images():
    ds = ShapesDataset(size=64, length=8, split="val")
    images = [ds.render(i) for i in range(8)]
    hints = [edge_hint(im) for im in images]  # (3, H, W) in [0, 1], the batch format
    assert edge_scores(images, hints)["edge_f1"] == 1.0
    shifted = [np.roll(np.asarray(im), 5, axis=1) for im in images]  # content 5 px to the right
    scores = edge_scores(shifted, hints)
    assert scores["edge_f1"] < 0.5 and scores["n"] == 8
    pil_hints = [canny(im) for im in images]  # uint8 (H, W) maps also work
    assert edge_scores(images, pil_hints)["edge_precision"] == 1.0
    with pytest.raises(ValueError, match="one hint per image"):
        edge_scores(images, hints[:3])
