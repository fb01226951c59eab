"""The folder classifier of a class run's images is trained once and cached: loading it back builds it without random
init (every weight from the file) and gives the same network; a stale file, one tensor short, is retrained."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.data.folder import ImageFolderDataset
from ldm.eval.folder_classifier import FolderClassifierSettings, get_folder_classifier
from tests.init_guard import no_random_init

FAST = FolderClassifierSettings(width=8, epochs=1, batch_size=8)
SIZE = 16


@pytest.fixture
def classes(tmp_path):
    """Two class folders of 6 images each (dark and bright)."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(("dark", "bright")):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 80, (SIZE, SIZE, 3), dtype=np.uint8) + 150 * k
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "images" / name / f"{i}.png")
    return ImageFolderDataset(str(tmp_path / "images"), size=SIZE, captions="subfolders")


def test_a_cached_folder_classifier_loads_without_random_init_as_trained(classes, tmp_path):
    trained = get_folder_classifier(classes, 2, tmp_path / "cache", FAST)
    (cached,) = (tmp_path / "cache").iterdir()
    with no_random_init() as touched:
        loaded = get_folder_classifier(classes, 2, tmp_path / "cache", FAST)
    assert touched == [] and not loaded.training
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in loaded.state_dict().items())
    x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(loaded(x), trained(x))
    state = trained.state_dict()
    save_file({k: v for k, v in state.items() if k != "head.weight"}, str(cached))  # stale: one tensor short
    mtime = cached.stat().st_mtime_ns
    retrained = get_folder_classifier(classes, 2, tmp_path / "cache", FAST)
    assert cached.stat().st_mtime_ns != mtime and torch.equal(retrained.head.weight, trained.head.weight)
