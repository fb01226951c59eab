"""ImageFolderDataset: caption layouts, modes, and robustness to the bad files real folders contain."""

import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.folder import DataWarning, ImageFolderDataset

SIZE = 32


def _save(path, size=(48, 40), color=(200, 30, 30), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def _no_warnings(**kwargs) -> ImageFolderDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        return ImageFolderDataset(**kwargs)


def _check_item(item, path):
    assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert item["path"] == path


def test_metadata_jsonl(tmp_path):
    for name in ("a.png", "sub/b.jpg"):
        _save(tmp_path / name)
    lines = [
        {"file_name": "a.png", "text": "a red thing"},
        {"file_name": "sub/b.jpg", "text": "  another  ", "label": 3},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    ds = _no_warnings(root=str(tmp_path), size=SIZE)
    assert ds.captions == "metadata" and len(ds) == 2
    _check_item(ds[0], "a.png")
    assert (ds[0]["caption"], ds[0]["label"]) == ("a red thing", 0)
    assert (ds[1]["caption"], ds[1]["label"], ds[1]["path"]) == ("another", 3, "sub/b.jpg")
    assert ds[0]["image"][0].mean() > 0.5 and ds[0]["image"][1].mean() < -0.5  # red stays red


def test_sidecar_txt_and_missing_caption(tmp_path):
    _save(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("a caption\n", encoding="utf-8")
    _save(tmp_path / "y.webp")
    with pytest.warns(DataWarning, match="1 missing"):
        ds = ImageFolderDataset(str(tmp_path), size=SIZE)
    assert ds.captions == "txt"
    assert [ds[i]["caption"] for i in range(2)] == ["a caption", ""]
    assert ds.caption_issues == [("y.webp", "missing")]


def test_subfolder_labels(tmp_path):
    for cls in ("red_car", "blue_boat"):
        for i in range(2):
            _save(tmp_path / cls / f"{i}.png")
    ds = _no_warnings(root=str(tmp_path), size=SIZE)
    assert ds.captions == "subfolders" and ds.classes == ["blue_boat", "red_car"] and ds.num_classes == 2
    assert [(ds[i]["label"], ds[i]["caption"]) for i in range(4)] == [(0, "blue boat")] * 2 + [(1, "red car")] * 2
    _check_item(ds[0], "blue_boat/0.png")


def test_broken_files_are_skipped_with_one_warning(tmp_path):
    for i in range(3):
        _save(tmp_path / f"good{i}.png")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image at all")
    _save(tmp_path / "tiny.png", size=(4, 4))
    _save(tmp_path / "huge.png", size=(300, 300))
    with pytest.warns(DataWarning) as record:
        ds = ImageFolderDataset(str(tmp_path), size=SIZE, captions="txt", min_size=8, max_pixels=200 * 200)
    skip_warnings = [w for w in record if "skipped 4 file" in str(w.message)]
    assert len(skip_warnings) == 1
    message = str(skip_warnings[0].message)
    assert all(name in message for name in ("zero.png", "text.png", "tiny.png", "huge.png"))
    assert {name for name, _ in ds.skipped} == {"zero.png", "text.png", "tiny.png", "huge.png"}
    # The truncated JPEG passes the cheap scan but fails to decode: replaced by the next item, warned, counted.
    index = [r.rel for r in ds.records].index("truncated.jpg")
    with pytest.warns(DataWarning, match="truncated.jpg"):
        items = [ds[i] for i in range(len(ds))]
    assert ds.load_failures == 1 and items[index]["path"] == ds.records[(index + 1) % len(ds)].rel
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        assert ds[index]["path"] != "truncated.jpg"  # known bad: skipped silently afterwards
    assert len(ds.skipped) + ds.load_failures == 5


def test_modes_convert_to_rgb(tmp_path):
    size = (SIZE, SIZE)
    _save(tmp_path / "l.png", size, 128, "L")
    rgba = Image.new("RGBA", size, (0, 0, 255, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(tmp_path / "rgba.png")
    p = Image.new("P", size, 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.save(tmp_path / "p.png", transparency=0)
    Image.fromarray(np.full((SIZE, SIZE), 65535, np.uint16)).save(tmp_path / "i16.png")
    Image.new("CMYK", size, (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    _save(tmp_path / "la.png", size, (0, 0), "LA")
    ds = ImageFolderDataset(str(tmp_path), size=SIZE)  # no .txt beside them: captions none, nothing to warn about
    assert ds.captions == "none"
    px = {ds[i]["path"]: ((ds[i]["image"] + 1) * 127.5).round().to(torch.int64) for i in range(len(ds))}
    assert px["l.png"][:, 5, 5].tolist() == [128, 128, 128]
    assert px["rgba.png"][:, 0, 0].tolist() == [255, 255, 255]  # transparent → white
    assert px["rgba.png"][:, 5, 5].tolist() == [0, 0, 255]
    assert px["p.png"][:, 0, 0].tolist() == [255, 255, 255] and px["p.png"][:, 5, 5].tolist() == [0, 255, 0]
    assert px["i16.png"][:, 5, 5].tolist() == [255, 255, 255]  # 16-bit white is white, not clipped noise
    assert (px["cmyk.jpg"][:, 5, 5] >= 250).all()  # CMYK (0,0,0,0) is white
    assert px["la.png"][:, 5, 5].tolist() == [255, 255, 255]  # fully transparent grey → white


def test_sixteen_bit_mid_grey_is_scaled(tmp_path):
    Image.fromarray(np.full((SIZE, SIZE), 32896, np.uint16)).save(tmp_path / "g.png")  # 128 · 257
    (tmp_path / "g.txt").write_text("grey")
    ds = _no_warnings(root=str(tmp_path), size=SIZE)
    assert ((ds[0]["image"] + 1) * 127.5).round()[:, 3, 3].tolist() == [128, 128, 128]


def test_empty_or_unreadable_folder_raises(tmp_path):
    with pytest.raises(ValueError, match=r"(?s)no readable images in .*empty.*\.png"):
        (tmp_path / "empty").mkdir()
        ImageFolderDataset(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_text("nope")
    with pytest.raises(ValueError, match="x.png"):
        ImageFolderDataset(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "missing"))


def test_metadata_path_traversal_is_refused(tmp_path):
    root = tmp_path / "data"
    _save(root / "ok.png")
    secret = _save(tmp_path / "secret.png")
    lines = [
        {"file_name": "ok.png", "text": "fine"},
        {"file_name": "../secret.png", "text": "escape"},
        {"file_name": str(secret), "text": "absolute"},
        {"file_name": "sub/../../secret.png", "text": "sneaky"},
    ]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(l) for l in lines))
    with pytest.warns(DataWarning, match="escapes the root"):
        ds = ImageFolderDataset(str(root), size=SIZE)
    assert [r.rel for r in ds.records] == ["ok.png"]
    assert sum("escapes the root" in why for _, why in ds.skipped) == 3


def test_non_utf8_captions_warn_and_decode_with_replacement(tmp_path):
    _save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    _save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("   ")
    with pytest.warns(DataWarning, match=r"1 empty, 1 not UTF-8"):
        ds = ImageFolderDataset(str(tmp_path), size=SIZE)
    assert ds[0]["caption"] == "caf\ufffd au lait" and ds[1]["caption"] == ""
    root = tmp_path / "meta"
    _save(root / "m.png")
    (root / "metadata.jsonl").write_bytes(b'{"file_name": "m.png", "text": "na\xefve"}\n')
    with pytest.warns(DataWarning, match="not UTF-8"):
        assert ImageFolderDataset(str(root), size=SIZE)[0]["caption"] == "na\ufffdve"


def test_hint_dir_gets_the_same_crop_and_flip(tmp_path):
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, 256, (SIZE, 48), dtype=np.uint8)  # wider than tall: random crops move
    _save(tmp_path / "imgs" / "a.png", size=(1, 1))  # replaced below
    Image.fromarray(np.stack([pattern] * 3, -1)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "a.txt").write_text("pattern")
    (tmp_path / "edges").mkdir()
    Image.fromarray(pattern).save(tmp_path / "edges" / "a.png")
    torch.manual_seed(0)
    ds = _no_warnings(root=str(tmp_path / "imgs"), size=SIZE, center_crop=False, random_flip=True,
                      hint_dir=str(tmp_path / "edges"))
    crops = set()
    for _ in range(12):
        item = ds[0]
        assert item["hint"].shape == (3, SIZE, SIZE) and 0 <= item["hint"].min() and item["hint"].max() <= 1
        assert torch.allclose(item["hint"], (item["image"] + 1) / 2, atol=1e-5)
        crops.add(item["image"].sum().item())
    assert len(crops) > 2  # crops and flips really vary


def test_missing_hint_is_skipped(tmp_path):
    for name in ("a", "b"):
        _save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(name)
    (tmp_path / "hints").mkdir()
    _save(tmp_path / "hints" / "a.png", mode="L", color=255)
    with pytest.warns(DataWarning, match="no hint image"):
        ds = ImageFolderDataset(str(tmp_path), size=SIZE, captions="txt", hint_dir="hints")
    assert [r.rel for r in ds.records] == ["a.png"]  # hint_dir inside the root is not scanned as images
    assert ds[0]["hint"].min() == 1.0


def test_built_from_config(tmp_path):
    from ldm.core.config import ConfigError, instantiate_from_config

    _save(tmp_path / "cls" / "a.png")
    node = {"target": "ldm.data.folder.ImageFolderDataset", "params": {"root": str(tmp_path), "size": SIZE}}
    assert len(instantiate_from_config(node)) == 1
    node["params"]["hint_dir"] = 3
    with pytest.raises(ConfigError, match="hint_dir"):
        instantiate_from_config(node)
