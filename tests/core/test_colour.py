"""Colour fidelity: the loading path keeps saturated colours exactly, and the measure reports a drift per channel."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ldm.core.colour import SaturatedError, bicubic_roundtrip, saturated_mask
from ldm.core.images import from_pil, to_pil
from ldm.data.folder import ImageFolderDataset
from ldm.nets.autoencoder.model import AutoencoderKL

SATURATED = {"red": (255, 0, 0), "pink": (255, 105, 180), "orange": (255, 140, 0), "blue": (0, 0, 255)}


@pytest.mark.parametrize("suffix, tolerance", [(".png", 0), (".jpg", 1)])
def test_saturated_colours_load_exactly(tmp_path, suffix, tolerance):
    """A red → orange drift is not in loading: flat colours come back within JPEG's rounding."""
    for name, colour in SATURATED.items():
        Image.new("RGB", (90, 60), colour).save(tmp_path / f"{name}{suffix}", quality=90)
    ds = ImageFolderDataset(str(tmp_path), size=32, captions="none")
    for item in (ds[i] for i in range(len(ds))):
        levels = ((item["image"] + 1) * 127.5).round()  # (3, 32, 32)
        expected = torch.tensor(SATURATED[item["path"].split(".")[0]], dtype=torch.float32)[:, None, None]
        assert (levels - expected).abs().max() <= tolerance, item["path"]
        assert to_pil(item["image"])[0].getpixel((3, 3)) == tuple(int(v) for v in levels[:, 3, 3])
        assert torch.equal(from_pil(to_pil(item["image"])[0]), item["image"])


def test_saturated_error_reports_the_channel_that_drifts():
    red = torch.tensor([1.0, -1.0, -1.0])[None, :, None, None].expand(2, 3, 4, 4)
    grey = torch.zeros(2, 3, 4, 4)
    x = torch.cat([red, grey], dim=3)  # left half red, right half grey (not saturated)
    orange = x.clone()
    orange[:, 1, :, :4] = -0.2  # green up by 0.8 → +102 levels on the red pixels only
    err = SaturatedError()
    err.update(x, orange)
    assert saturated_mask(x).sum() == 2 * 4 * 4 and err.count == 32
    assert err.bias() == "R +0.0 / G +102.0 / B +0.0" and err.mean_absolute() == pytest.approx(34.0)


def test_untrained_bicubic_skip_vae_is_the_bicubic_roundtrip():
    dd = dict(double_z=True, z_channels=3, resolution=32, in_channels=3, out_ch=3, ch=8, ch_mult=[1, 2, 2],
              num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    vae = AutoencoderKL(dd, 3, bicubic_skip=True)
    x = torch.rand(2, 3, 32, 32) * 1.6 - 0.8
    with torch.no_grad():
        assert torch.allclose(vae.decode(vae.encode(x).mode()), bicubic_roundtrip(x, 4), atol=1e-6)
    with pytest.raises(ValueError, match="bicubic_skip needs embed_dim"):
        AutoencoderKL(dd | {"z_channels": 2}, 2, bicubic_skip=True)


def test_vae_rows_by_source_photo():
    from ldm.eval.vae_recon import by_source

    row = {"time": "t", "run": "r", "checkpoint": "c", "data": "data.val"}
    rows = by_source(row, ["val/Cups-0001.png", "val/Cups-0002.png", "val/Path-0001.png"],
                     torch.tensor([30.0, 32.0, 28.0]), torch.tensor([25.0, 27.0, 28.5]), 4)
    assert [(r["data"], r["n"], r["psnr_db"], r["bicubic_x4_psnr_db"]) for r in rows] == [
        ("data.val: Cups", 2, 31.0, 26.0), ("data.val: Path", 1, 28.0, 28.5)]
