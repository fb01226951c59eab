"""Folders read the way they look: every image file is used or reported (left out of metadata.jsonl, named twice,
behind a link, in an empty class), classes numbered once over train/ and val/, empty classes kept with a warning
or refused, and per-image .txt captions winning over sub-folder names (a mode that ignores them says so)."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from ldm.data.folder import DataWarning, ImageFolderDataset
from ldm.data.folder_layout import summarize


def draw(folder, names, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(np.full((20, 20, 3), rng.integers(0, 255, 3), dtype=np.uint8)).save(folder / f"{name}.png")


def read(**kwargs) -> tuple[ImageFolderDataset, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = ImageFolderDataset(size=16, **kwargs)
    return data, "\n".join(str(w.message) for w in caught if issubclass(w.category, DataWarning))


def test_images_left_out_of_metadata_or_named_twice_are_reported(tmp_path):
    draw(tmp_path, [f"img{i}" for i in range(6)])
    lines = [{"file_name": "img0.png", "text": "zero"}, {"file_name": "img1.png", "text": "one"},
             {"file_name": "img1.png", "text": "one again"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    data, said = read(root=str(tmp_path))
    assert [r.caption for r in data.records] == ["zero", "one"]  # the duplicate is not trained on twice
    assert "5 image file(s) not used" in said and "not listed in metadata.jsonl" in said and "img2.png" in said
    assert "named again in metadata.jsonl" in said


def test_an_empty_class_keeps_its_number_with_a_warning_or_is_refused(tmp_path):
    for name in ("1", "3"):
        draw(tmp_path / name, ["a", "b"])
    (tmp_path / "2").mkdir()
    data, said = read(root=str(tmp_path), captions="subfolders")
    assert data.classes == ["1", "2", "3"] and {r.label for r in data.records if r.rel.startswith("3/")} == {2}
    assert "1 class folder(s) hold no images" in said and "2" in said
    assert summarize(tmp_path).classes == ["1", "2", "3"]
    with pytest.raises(ValueError, match="hold no images: 2"):
        ImageFolderDataset(str(tmp_path), 16, captions="subfolders", empty_classes="refuse")


def test_train_and_val_classes_are_numbered_once(tmp_path):
    draw(tmp_path / "train" / "cat", ["a", "b"])
    draw(tmp_path / "train" / "dog", ["a", "b"])
    draw(tmp_path / "val" / "bird", ["a"])
    draw(tmp_path / "val" / "dog", ["c"])
    train, _ = read(root=str(tmp_path), captions="subfolders", split="train")
    val, _ = read(root=str(tmp_path), captions="subfolders", split="val")
    assert train.classes == val.classes == ["bird", "cat", "dog"]
    assert {r.label for r in val.records if r.rel.startswith("dog/")} == {r.label for r in train.records
                                                                         if r.rel.startswith("dog/")} == {2}
    assert summarize(tmp_path, "subfolders").classes == ["bird", "cat", "dog"]


def test_per_image_captions_win_over_sub_folder_names(tmp_path):
    for folder in ("beach", "city"):
        draw(tmp_path / folder, ["x", "y"])
        for name in ("x", "y"):
            (tmp_path / folder / f"{name}.txt").write_text(f"a photo {name} of the {folder}")
    data, _ = read(root=str(tmp_path))
    assert data.captions == "txt" and data.records[0].caption == "a photo x of the beach"
    assert summarize(tmp_path).captions == "txt"
    _, said = read(root=str(tmp_path), captions="subfolders")
    assert "4 image(s)" in said and "captions=subfolders ignores" in said


def test_images_behind_a_folder_link_are_reported(tmp_path):
    draw(tmp_path / "elsewhere", ["far"])
    draw(tmp_path / "root", ["near"])
    os.symlink(tmp_path / "elsewhere", tmp_path / "root" / "linked")
    data, said = read(root=str(tmp_path / "root"), captions="none")
    assert len(data) == 1 and "linked (a link to a folder: not followed)" in said
