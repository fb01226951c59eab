"""Classifier guidance on the exact two-component mixture (ldm.eval.gaussian): the classifier's gradient against a finite
difference, and guidance that samples the chosen component (and nothing at scale 0), for ε, v and flow models."""

import json

import pytest
import torch
from PIL import Image

from ldm.diffusion import Denoiser, FlowSchedule, VPSchedule, sample_latents
from ldm.diffusion.classifier_guidance import ClassifierGuidance, class_log_prob_grad
from ldm.eval.gaussian import MIXTURE_STDS, ideal_model_fn, mixture_classifier_fn, mixture_logits, mixture_x0
from ldm.inference.pipeline import NotAnLDMRunError, Pipeline, PipelineError
from ldm.nets.conditioning.embedders import UnconditionalEmbedder
from ldm.training.driver import train
from tests.conftest import TINY
from tests.scripts import load_script

SHAPE = (1, 4, 4)
N = 1000
CASES = [(VPSchedule("linear"), "eps"), (VPSchedule("linear"), "v"), (FlowSchedule(), "flow")]


def test_the_gradient_is_the_finite_difference_of_log_p():
    schedule = VPSchedule("linear")
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(3, *SHAPE, generator=g, dtype=torch.float64), torch.tensor([0.3, 1.0, 4.0])
    labels = torch.tensor([0, 1, 0])
    grad = class_log_prob_grad(mixture_classifier_fn(schedule), schedule, x.float(), sigma, labels)

    def log_p(x_):
        return mixture_logits(x_, sigma.double()).log_softmax(-1).gather(1, labels.view(-1, 1)).sum()

    eps = 1e-4
    for index in [(0, 0, 0, 0), (1, 0, 2, 3), (2, 0, 3, 1)]:
        bump = torch.zeros_like(x)
        bump[index] = eps
        numeric = (log_p(x + bump) - log_p(x - bump)) / (2 * eps)
        assert grad[index].item() == pytest.approx(numeric.item(), rel=2e-3, abs=1e-4)


def _components(x):
    """Component of each sample (the mixture means are −1 and +1) and the within-image std of each component."""
    means = x.flatten(1).mean(1)
    k = (means > 0).long()
    return k, [(x[k == c] - means[k == c].view(-1, 1, 1, 1)).std().item() if (k == c).any() else 0.0 for c in (0, 1)]


@pytest.mark.parametrize("schedule,param", CASES, ids=[p for _, p in CASES])
def test_guidance_samples_the_chosen_component_and_scale_zero_changes_nothing(schedule, param):
    denoiser = Denoiser(ideal_model_fn(schedule, param, mixture_x0), schedule, param)
    noise = torch.randn(N, *SHAPE, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(N, dtype=torch.long)  # component 0 (mean −1, std 0.3)
    plain = sample_latents(denoiser, noise, {}, sampler="dpmpp_2m", steps=25).x
    k_plain, _ = _components(plain)
    assert 0.4 < k_plain.float().mean() < 0.6  # both components, as the prior
    off = ClassifierGuidance(mixture_classifier_fn(schedule), schedule, labels, scale=0.0)
    assert torch.equal(sample_latents(denoiser, noise, {}, sampler="dpmpp_2m", steps=25, classifier_guidance=off).x,
                       plain)
    # at scale 1 with the exact p(y | x), ∇ log p(x) + ∇ log p(y | x) = ∇ log p(x | y): the component itself
    on = ClassifierGuidance(mixture_classifier_fn(schedule), schedule, labels, scale=1.0)
    guided = sample_latents(denoiser, noise, {}, sampler="dpmpp_2m", steps=25, classifier_guidance=on).x
    k, stds = _components(guided)
    assert (k == 0).float().mean() > 0.97
    assert stds[0] == pytest.approx(MIXTURE_STDS[0].item(), rel=0.1)


@pytest.fixture(scope="module")
def tiny_classifier_run(workdir, toy_vae_run):
    """A noise-aware classifier trained on the tiny text cache (6 steps)."""
    cfg = str(TINY / "classifier.yaml")
    overrides = [f"cache.vae={toy_vae_run}", f"cache.dir={workdir / 'cache' / 'toy-text'}"]
    return train("classifier", cfg, ["--cfg", cfg, "--runs-dir", str(workdir / "runs"), *overrides])


@pytest.mark.slow
def test_a_trained_classifier_steers_a_class_run_through_the_pipeline(tiny_classifier_run, tiny_class_run):
    assert (tiny_classifier_run / "checkpoints" / "last.ckpt").is_file()
    pipe = Pipeline.from_run(tiny_class_run, device="cpu")
    labels = [3, 77]
    plain = pipe.generate_tensors(labels, steps=3, sampler="dpmpp_2m", guidance=2.0, seed=0)
    with pytest.raises(PipelineError, match="needs a classifier"):
        pipe.generate_tensors(labels, steps=3, classifier_scale=2.0)
    pipe.with_classifier(tiny_classifier_run)
    same = pipe.generate_tensors(labels, steps=3, sampler="dpmpp_2m", guidance=2.0, seed=0, classifier_scale=0.0)
    steered = pipe.generate_tensors(labels, steps=3, sampler="dpmpp_2m", guidance=2.0, seed=0, classifier_scale=50.0)
    assert torch.equal(same, plain) and not torch.allclose(steered, plain, atol=1e-3)
    generation = pipe.generate(labels, steps=2, classifier_scale=1.5)
    assert generation.settings["classifier_scale"] == 1.5
    with pytest.raises(NotAnLDMRunError, match="not a classifier run"):
        pipe.with_classifier(tiny_class_run)


def test_the_unconditional_embedder_ignores_the_label_but_checks_it():
    embedder = UnconditionalEmbedder(n_classes=5, embed_dim=4)
    out = embedder(torch.tensor([0, 3, 5]))
    assert out.shape == (3, 1, 4) and torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    with pytest.raises(ValueError, match="out of range"):
        embedder(torch.tensor([6]))


@pytest.mark.slow
def test_txt2img_classifier_guidance_records_it_in_the_png(tiny_classifier_run, tiny_class_run, tmp_path, capsys):
    txt2img = load_script("txt2img")
    out = tmp_path / "out"
    argv = ["--run", str(tiny_class_run), "--class", "3", "--classifier", str(tiny_classifier_run),
            "--classifier-scale", "2", "--steps", "2", "--sampler", "euler", "--seed", "1", "--out", str(out)]
    assert txt2img.main(argv) == 0
    meta = json.loads(Image.open(out / "00000-s1-class3.png").text["ldm"])
    assert meta["classifier_scale"] == 2.0 and meta["classifier"] == str(tiny_classifier_run)
    capsys.readouterr()
    assert txt2img.main(["--run", str(tiny_class_run), "--class", "3", "--classifier-scale", "2", "--out", str(out)]) == 2
    assert "needs --classifier" in capsys.readouterr().err
