"""Shapes classifier (training, cache, prediction), Fréchet distance closed forms, class accuracy and FID."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm.data.shapes import NUM_CLASSES, ShapesDataset
from ldm.eval.classifier import (
    ClassifierSettings,
    cache_path,
    features,
    get_classifier,
    predict,
)
from ldm.eval.fid import frechet_distance
from ldm.eval.measures import class_accuracy, fid
from tests.init_guard import no_random_init

# A small, quickly trained classifier for the mechanics (16 px, a few seconds).
FAST = dict(n_train=1500, epochs=4, batch_size=32, lr=1e-2, n_val=200)  # 99 % on the 300 test images below
# The default classifier at 32 px is trained once and kept between test sessions, as evaluate.py keeps it.
SHARED_CACHE = Path(os.environ.get("TMPDIR", "/tmp")) / "ldm-test-cache" / "classifier"


@pytest.fixture(scope="module")
def fast_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("classifier")


def _val(n: int, size: int, seed: int = 0):
    ds = ShapesDataset(size=size, length=n, seed=seed, split="val")
    items = [ds[i] for i in range(n)]
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])


# ----------------------------------------------------------------------------------- Fréchet distance

def test_frechet_identical_and_shifted_sets():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))  # correlated features
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = rng.normal(size=8)
    # same covariance, shifted mean: exactly ‖μ1 − μ2‖²
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # scaled copy: Σ2 = 4 Σ1, (Σ1 Σ2)^½ = 2 Σ1 → d = Tr(Σ1) (+ the mean term, zero for centred a)
    centred = a - a.mean(0)
    assert frechet_distance(centred, 2 * centred) == pytest.approx(np.trace(np.cov(centred, rowvar=False)), rel=1e-6)


def test_frechet_independent_gaussians_and_edge_cases():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20000, 4))
    b = rng.normal(size=(20000, 4)) + np.array([1.0, 0.0, 0.0, 2.0])
    assert frechet_distance(a, b) == pytest.approx(5.0, abs=0.1)  # ‖μ1 − μ2‖² = 1 + 4
    few = rng.normal(size=(5, 16))  # fewer samples than dimensions: singular covariances
    value = frechet_distance(few, rng.normal(size=(6, 16)))
    assert np.isfinite(value) and value > 0
    assert frechet_distance(torch.from_numpy(a[:100]), torch.from_numpy(a[:100])) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(a[:10], a[:10, :3])
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(a[:1], a[:10])


# ------------------------------------------------------------------------------------------ classifier

def test_classifier_trains_caches_and_reloads(fast_cache):
    path = cache_path(ClassifierSettings(size=16, **FAST), fast_cache)
    assert not path.exists()
    model = get_classifier(16, fast_cache, **FAST)
    assert path.is_file() and path.name.startswith("shapes-16-") and path.suffix == ".safetensors"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    x, y = _val(300, 16, seed=1)
    assert (predict(model, x) == y).float().mean() >= 0.9
    mtime = path.stat().st_mtime_ns
    with no_random_init() as touched:  # built without weights: every one comes from the file
        again = get_classifier(16, fast_cache, **FAST)  # loaded, not retrained
    assert path.stat().st_mtime_ns == mtime and touched == []
    for (k, v), w in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(v, w), k
    other = cache_path(ClassifierSettings(size=16, **{**FAST, "epochs": 7}), fast_cache)
    assert other != path  # another setting, another file


def test_corrupt_cache_file_is_retrained(tmp_path):
    settings = dict(n_train=64, epochs=1, batch_size=32, n_val=16)  # two steps: what is written matters, not accuracy
    path = cache_path(ClassifierSettings(size=8, **settings), tmp_path)
    path.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="retraining"):
        model = get_classifier(8, tmp_path, **settings)
    assert path.stat().st_size > 1000 and predict(model, _val(4, 8)[0]).shape == (4,)
    state = model.state_dict()
    save_file({k: v for k, v in list(state.items())[1:]}, str(path))  # stale: one tensor short
    with pytest.warns(UserWarning, match=rf"missing: {re.escape(next(iter(state)))}\).*retraining"):
        get_classifier(8, tmp_path, **settings)


def test_predict_and_features_accept_pil_tensors_and_other_sizes(fast_cache):
    model = get_classifier(16, fast_cache, **FAST)
    x, _ = _val(6, 16)
    ds = ShapesDataset(size=16, length=6, split="val")
    pil = [ds.render(i) for i in range(6)]
    assert torch.equal(predict(model, pil), predict(model, x))
    f = features(model, x)
    assert f.shape == (6, model.feature_dim) and torch.isfinite(f).all()
    assert predict(model, torch.nn.functional.interpolate(x, size=24)).shape == (6,)  # resized to 16
    assert predict(model, x).max() < NUM_CLASSES


@pytest.fixture(scope="module")
def default_classifier():
    return get_classifier(32, SHARED_CACHE)


def test_class_accuracy_of_true_images(default_classifier):
    ds = ShapesDataset(size=32, length=400, seed=7, split="test")  # a split the classifier never saw
    images = [ds.render(i) for i in range(len(ds))]
    labels = [ds.spec(i).label for i in range(len(ds))]
    result = class_accuracy(images, labels, default_classifier)
    assert result["class_accuracy"] >= 0.98 and result["n"] == 400
    wrong = [(label + 1) % NUM_CLASSES for label in labels]
    assert class_accuracy(images, wrong, default_classifier)["class_accuracy"] < 0.05


def test_fid_separates_real_from_degraded(default_classifier):
    real_a, _ = _val(300, 32, seed=1)
    real_b, _ = _val(300, 32, seed=2)
    g = torch.Generator().manual_seed(0)
    noisy = (real_b + 0.5 * torch.randn(real_b.shape, generator=g)).clamp(-1, 1)
    grey = real_b.mean(1, keepdim=True).expand_as(real_b)  # colours gone
    same = fid(real_a, real_b, default_classifier)
    assert same < fid(real_a, noisy, default_classifier) and 5 * same < fid(real_a, grey, default_classifier)
