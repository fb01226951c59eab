"""Control images (a ControlNet's hint): read in any size, cut to the VAE grid or resized, edge-detected on request,
and refused in one line when unreadable or off the grid."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.inference.control_image import ControlImageError, load_control_image


def test_control_images_are_read_resized_and_optionally_edge_detected(tmp_path):
    edges = np.zeros((20, 36, 3), np.uint8)
    edges[5, :, :] = 255
    Image.fromarray(edges).save(tmp_path / "edges.png")
    hint = load_control_image(tmp_path / "edges.png")  # cut down to multiples of 8
    assert hint.shape == (1, 3, 16, 32) and hint.dtype == torch.float32 and set(hint.unique().tolist()) == {0.0, 1.0}
    assert load_control_image(tmp_path / "edges.png", height=64, width=48).shape == (1, 3, 64, 48)
    photo = np.zeros((32, 32, 3), np.uint8)
    photo[:, 16:] = (200, 30, 30)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    canny = load_control_image(tmp_path / "photo.png", canny=True)
    assert canny[0, :, :, 15:17].sum() > 0 and canny[0, :, :, :12].sum() == 0  # one vertical edge
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ControlImageError, match="broken.png"):
        load_control_image(tmp_path / "broken.png")
    with pytest.raises(ControlImageError, match="multiple of 8"):
        load_control_image(tmp_path / "edges.png", height=20)
