"""Aspect-ratio buckets: the bucket list, assignment and crops on images of known aspect (exact numbers), the recorded
micro-conditioning values, too-small and too-elongated images, and a config that gives no bucket."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from ldm.core.config import ConfigError
from ldm.core.images import from_pil
from ldm.data.buckets import BucketConfig, bucket_sizes, nearest_bucket, place
from ldm.data.folder import DataWarning, ImageFolderDataset

RED = (200, 10, 10)
MARK = 6  # side of the black square marking an image's top-left corner (dark after a 2× downscale)


def test_bucket_list_keeps_the_largest_sizes_within_the_area_and_aspect():
    assert bucket_sizes(64, 8) == [(48, 80), (56, 72), (64, 64), (72, 56), (80, 48)]
    assert bucket_sizes(32, 8) == [(24, 40), (32, 32), (40, 24)]
    assert bucket_sizes(32, 8, max_aspect=4.0) == [(16, 64), (24, 40), (32, 32), (40, 24), (64, 16)]
    sdxl = bucket_sizes(1024, 64)  # the SDXL base list's middle: 768×1344 … 1344×768
    assert sdxl[0] == (768, 1344) and (1024, 1024) in sdxl and sdxl[-1] == (1344, 768)
    for h, w in sdxl:
        assert h % 64 == 0 and w % 64 == 0 and h * w <= 1024**2 and max(h / w, w / h) <= 2.0


def test_nearest_bucket_by_log_aspect_and_the_cover_crop():
    sizes = bucket_sizes(64, 8)
    assert sizes[nearest_bucket(sizes, 100, 200)] == (48, 80)  # 2:1 → the widest, 5:3
    assert sizes[nearest_bucket(sizes, 90, 100)] == (64, 64)  # log(10/9) = 0.105 is nearer 0 than log(9/7) = 0.251
    assert sizes[nearest_bucket(sizes, 100, 125)] == (56, 72)  # log(5/4) = 0.223
    p = place(sizes, 100, 200)  # 200 wide, 100 tall
    assert (p.size, p.resized, p.crop("center"), p.upscaled, p.beyond_aspect) == ((48, 80), (48, 96), (0, 8), False,
                                                                                False)
    p = place(sizes, 100, 300)  # 3:1 is beyond max_aspect 2: counted, cropped to 5:3
    assert (p.size, p.resized, p.crop("center"), p.beyond_aspect) == ((48, 80), (48, 144), (0, 32), True)
    p = place(sizes, 30, 20)  # smaller than its bucket: upscaled to cover 48 wide × 80 tall
    assert (p.size, p.resized, p.crop("center"), p.upscaled) == ((80, 48), (80, 53), (0, 2), True)
    g = torch.Generator().manual_seed(0)
    crops = {place(sizes, 100, 200).crop("random", g) for _ in range(50)}
    assert {top for top, _ in crops} == {0} and {left for _, left in crops} == set(range(17))


def test_config_errors_name_the_numbers():
    with pytest.raises(ConfigError, match="resolution 4 .* step 8"):
        BucketConfig.from_config({"resolution": 4, "step": 8})
    with pytest.raises(ConfigError, match="buckets.crop"):
        BucketConfig.from_config({"resolution": 64, "step": 8, "crop": "middle"})
    with pytest.raises(ConfigError, match="buckets.max_aspct: unknown key"):
        BucketConfig.from_config({"resolution": 64, "step": 8, "max_aspct": 2})
    with pytest.raises(ConfigError, match="buckets.step"):
        BucketConfig.from_config({"resolution": 64})


def _folder(tmp_path, sizes: dict[str, tuple[int, int]]):
    for name, (w, h) in sizes.items():
        image = Image.new("RGB", (w, h), RED)
        image.paste((0, 0, 0), (0, 0, MARK, MARK))  # a mark in the top-left corner: crops differ
        image.save(tmp_path / f"{name}.png")
    return tmp_path


def test_folder_items_carry_bucket_size_original_size_and_crop(tmp_path):
    root = _folder(tmp_path, {"wide": (200, 100), "tall": (60, 120), "square": (50, 50), "tiny": (20, 30),
                              "pano": (300, 100)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolderDataset(str(root), captions="none", buckets={"resolution": 64, "step": 8})
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert any("2 image(s) smaller than their bucket are upscaled" in m for m in messages)
    assert any("1 image(s) more elongated" in m for m in messages)
    got = {}
    for i in range(len(ds)):
        item = ds[i]
        got[item["path"]] = (tuple(item["image"].shape[1:]), item["original_size"].tolist(),
                             item["crop_top_left"].tolist(), ds.bucket_ids[i])
    assert got == {
        "pano.png": ((48, 80), [100, 300], [0, 32], 0),
        "wide.png": ((48, 80), [100, 200], [0, 8], 0),
        "square.png": ((64, 64), [50, 50], [0, 0], 2),
        "tall.png": ((80, 48), [120, 60], [8, 0], 4),
        "tiny.png": ((80, 48), [30, 20], [0, 2], 4),
    }


def test_too_small_images_can_be_left_out(tmp_path):
    root = _folder(tmp_path, {"big": (128, 128), "small": (40, 40)})
    with pytest.warns(DataWarning, match="skipped 1 file.*small.png \\(smaller than its bucket"):
        ds = ImageFolderDataset(str(root), captions="none", buckets={"resolution": 64, "step": 8, "too_small": "skip"})
    assert [r.rel for r in ds.records] == ["big.png"] and ds.bucket_ids == [2]


def resized(root, name: str, size: tuple[int, int]) -> torch.Tensor:
    """The whole image resized (w, h) as the dataset resizes it, before cropping: (3, h, w) in [-1, 1]."""
    with Image.open(root / name) as image:
        return from_pil(image.convert("RGB").resize(size, resample=Image.BICUBIC))


def test_random_crop_varies_and_is_recorded(tmp_path):
    root = _folder(tmp_path, {"wide": (200, 100)})  # bucket 80×48, cover 96×48: 16 px to spare
    ds = ImageFolderDataset(str(root), captions="none", buckets={"resolution": 64, "step": 8, "crop": "random"})
    cover = resized(root, "wide.png", (96, 48))
    torch.manual_seed(0)
    lefts = set()
    for _ in range(12):
        item = ds[0]
        top, left = item["crop_top_left"].tolist()
        assert top == 0 and torch.equal(item["image"], cover[:, :, left:left + 80])  # the recorded crop, exactly
        lefts.add(left)
    assert len(lefts) > 1


def test_hints_follow_the_bucket_crop(tmp_path):
    """A stored hint is resized and cropped with its image (the same box), and Canny hints are of the crop."""
    root = tmp_path / "imgs"
    root.mkdir()
    array = torch.zeros(48, 96, 3, dtype=torch.uint8)
    array[:, 8:12] = 255  # a white bar 8 px in: the centre crop (left = 8) starts on it
    Image.fromarray(array.numpy()).save(root / "a.png")
    (root / "edges").mkdir()
    Image.fromarray(array.numpy()).save(root / "edges" / "a.png")  # the hint: the image itself
    buckets = {"resolution": 64, "step": 8}
    stored = ImageFolderDataset(str(root), captions="none", hint_dir="edges", buckets=buckets)[0]
    assert stored["crop_top_left"].tolist() == [0, 8] and stored["hint"].shape == (3, 48, 80)
    assert torch.equal(stored["hint"] * 2 - 1, stored["image"])  # no resize here: the same pixels, the same crop
    canny = ImageFolderDataset(str(root), captions="none", hint=True, buckets=buckets)[0]
    assert canny["hint"].shape == (3, 48, 80) and canny["hint"][0, :, 3:5].sum() > 0  # the bar's right edge


def test_a_mirrored_crop_records_its_left_edge_as_mirrored(tmp_path):
    """With random_flip, the recorded left edge is counted in the mirrored image, as the model sees it."""
    root = _folder(tmp_path, {"wide": (200, 100)})
    ds = ImageFolderDataset(str(root), captions="none", random_flip=True,
                            buckets={"resolution": 64, "step": 8, "crop": "random"})
    cover = resized(root, "wide.png", (96, 48))
    mirrored = cover.flip(-1)
    torch.manual_seed(1)
    kinds = set()
    for _ in range(16):
        item = ds[0]
        top, left = item["crop_top_left"].tolist()
        plain, flipped = cover[:, :, left:left + 80], mirrored[:, :, left:left + 80]
        assert top == 0 and (torch.equal(item["image"], plain) or torch.equal(item["image"], flipped))
        kinds.add(torch.equal(item["image"], flipped))
    assert kinds == {True, False}
