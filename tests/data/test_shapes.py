"""ShapesDataset: determinism, captions, labels, hints, any size; and the Canny helpers it uses."""

import hashlib
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.core.config import ConfigError, instantiate_from_config
from ldm.data import edges
from ldm.data.shapes import (
    CAPTION_TEMPLATES,
    COLORS,
    NUM_CLASSES,
    PALETTE,
    SHAPES,
    ShapesDataset,
    caption_for,
    class_factors,
    class_index,
    render,
)

N = 64


def _digest(ds: ShapesDataset, n: int) -> str:
    h = hashlib.sha256()
    for i in range(n):
        item = ds[i]
        h.update(item["image"].numpy().tobytes())
        h.update(item["caption"].encode())
    return h.hexdigest()


def test_item_format():
    item = ShapesDataset(size=32, length=10)[3]
    assert set(item) == {"image", "caption", "label", "path"}
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert isinstance(item["caption"], str) and isinstance(item["label"], int)
    assert item["path"] == "shapes/train/3"


def test_deterministic_per_index_and_seed():
    a, b = ShapesDataset(length=N, seed=1), ShapesDataset(length=N, seed=1)
    assert _digest(a, 16) == _digest(b, 16)
    assert torch.equal(a[5]["image"], a[5]["image"])  # same item every time, in any order
    assert _digest(a, 16) != _digest(ShapesDataset(length=N, seed=2), 16)


@pytest.mark.slow
def test_same_items_in_another_process():
    code = (
        "from ldm.data.shapes import ShapesDataset; import tests.data.test_shapes as t; "
        "print(t._digest(ShapesDataset(length=8, seed=3), 8))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _digest(ShapesDataset(length=8, seed=3), 8)


def test_splits_are_different_streams():
    train, val = ShapesDataset(length=N, split="train"), ShapesDataset(length=N, split="val")
    same = sum(torch.equal(train[i]["image"], val[i]["image"]) for i in range(N))
    assert same == 0
    assert val[0]["path"] == "shapes/val/0"
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(split="training")


def test_captions_mention_factors_and_vary():
    ds = ShapesDataset(length=200)
    phrasings = set()
    for i in range(200):
        f, caption = ds.factors(i), ds[i]["caption"]
        assert f["shape"] in caption and f"{f['color']} {f['shape']}" in caption
        assert f"{f['background']} background" in caption
        phrasings.add(ds.spec(i).phrasing)
    assert phrasings == set(range(len(CAPTION_TEMPLATES)))
    assert caption_for("circle", "red", "blue") == "a red circle on a blue background"
    variants = {caption_for("circle", "red", "blue", p) for p in range(len(CAPTION_TEMPLATES))}
    assert len(variants) == len(CAPTION_TEMPLATES)


def test_labels_match_factors_and_cover_all_combinations():
    ds = ShapesDataset(length=300)
    for i in range(300):
        assert class_factors(ds[i]["label"]) == ds.factors(i)
    combos = [(s, c, b) for s, c, b in itertools.product(SHAPES, COLORS, COLORS) if c != b]
    labels = [class_index(*combo) for combo in combos]
    assert sorted(labels) == list(range(NUM_CLASSES)) == list(range(ds.num_classes))
    assert all(tuple(class_factors(l).values()) == combo for l, combo in zip(labels, combos))
    with pytest.raises(ValueError):
        class_index("circle", "red", "red")


def test_factors_are_spread_and_fill_differs_from_background():
    ds = ShapesDataset(length=400)
    facts = [ds.factors(i) for i in range(400)]
    assert {f["shape"] for f in facts} == set(SHAPES)
    assert {f["color"] for f in facts} == set(COLORS) == {f["background"] for f in facts}
    assert all(f["color"] != f["background"] for f in facts)


def test_shape_stays_inside_and_border_is_background():
    ds = ShapesDataset(size=32, length=200)
    for i in range(200):
        a = np.asarray(ds.render(i)).astype(int)
        ring = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        assert (ring == PALETTE[ds.factors(i)["background"]]).all()
        assert (np.abs(a - PALETTE[ds.factors(i)["color"]]).sum(-1) == 0).sum() > 10  # the shape is there


@pytest.mark.parametrize("size", [8, 17, 64, 100])
def test_any_size(size):
    item = ShapesDataset(size=size, length=4, hint=True)[1]
    assert item["image"].shape == item["hint"].shape == (3, size, size)


def test_render_is_antialiased_with_the_right_area():
    for shape, area in [("circle", np.pi * 64), ("square", 256.0), ("triangle", 128.0)]:
        a = np.asarray(render(shape, (255, 255, 255), (0, 0, 0), 32, (16.0, 16.0), 8.0))[..., 0] / 255.0
        assert abs(a.sum() - area) < 0.03 * area
    edge = np.asarray(render("circle", "white", "black", 32, (16.0, 16.0), 8.0))[..., 0]
    assert ((edge > 0) & (edge < 255)).any()  # partial coverage on the rim


def test_hint_only_when_asked_and_in_range():
    assert "hint" not in ShapesDataset(length=2)[0]
    ds = ShapesDataset(size=32, length=20, hint=True)
    for i in range(20):
        hint = ds[i]["hint"]
        assert hint.shape == (3, 32, 32) and hint.dtype == torch.float32
        assert set(hint.unique().tolist()) <= {0.0, 1.0} and hint.sum() > 0
        assert torch.equal(hint[0], hint[1]) and torch.equal(hint[0], hint[2])
        spec = ds.spec(i)  # edges sit near the shape, not in the background far away
        ys, xs = torch.nonzero(hint[0], as_tuple=True)
        assert ((xs + 0.5 - spec.center[0]).abs() <= spec.radius + 2).all()
        assert ((ys + 0.5 - spec.center[1]).abs() <= spec.radius + 2).all()


def test_every_palette_pair_is_far_apart_and_gives_edges():
    for a, b in itertools.combinations(COLORS, 2):
        assert np.linalg.norm(np.subtract(PALETTE[a], PALETTE[b])) >= 200
        assert edges.canny(render("square", a, b, 32, (16.0, 16.0), 8.0)).any(), (a, b)


def test_canny_inputs_and_thresholds():
    image = render("circle", "red", "blue", 32, (16.0, 16.0), 8.0)
    e = edges.canny(image, 100, 200)
    assert e.dtype == np.uint8 and e.shape == (32, 32) and set(np.unique(e)) == {0, 255}
    assert np.array_equal(e, edges.canny(np.asarray(image), 100, 200))
    assert not edges.canny(np.full((16, 16), 7, np.uint8)).any()
    assert edges.canny(image, 2000, 3000).sum() == 0  # thresholds above any gradient: no edges
    with pytest.raises(ValueError):
        edges.canny(image, 200, 100)
    with pytest.raises(TypeError):
        edges.canny(np.zeros((8, 8, 3), np.float32))
    hint = edges.hint_from_image(Image.fromarray(e))
    assert torch.equal(hint, edges.edge_hint(image, 100, 200))


def test_built_from_config_with_checked_types():
    node = {"target": "ldm.data.shapes.ShapesDataset", "params": {"size": 16, "length": 5, "hint": True}}
    ds = instantiate_from_config(node)
    assert len(ds) == 5 and ds[0]["hint"].shape == (3, 16, 16)
    with pytest.raises(ConfigError, match="size"):
        instantiate_from_config({"target": "ldm.data.shapes.ShapesDataset", "params": {"size": "16"}})
