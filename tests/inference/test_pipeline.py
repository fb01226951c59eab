"""The Pipeline on toy models: in memory (tests/components.py) for sampling — sizes, seeds, DDIM determinism, CFG at
scale 1, bad requests, labels — and loaded from runs written to disk for from_run — EMA, dtype, refusals."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ldm.core.errors import UserError
from ldm.diffusion import Denoiser, sample
from ldm.inference.pipeline import (
    NotAnLDMRunError,
    Pipeline,
    PipelineError,
    describe_run,
)
from ldm.io.checkpoints import CheckpointError
from ldm.io.runs import RunError
from tests.components import shared_run_pipeline, tiny_pipeline

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]
FAST = dict(steps=3, sampler="euler")


@pytest.fixture(scope="module")
def pipe():
    """The toy text model in memory, its EMA weights in the U-Net (what from_run of its written run loads)."""
    return tiny_pipeline("text")


@pytest.fixture(scope="module")
def loaded(toy_ldm_run):
    return shared_run_pipeline(toy_ldm_run)  # read only


def arrays(images):
    return np.stack([np.asarray(im) for im in images])


def test_from_run_loads_what_the_run_holds(loaded, pipe, toy_ldm_run):
    assert loaded.source["ema"] and loaded.source["run"] == str(toy_ldm_run.resolve())
    assert loaded.condition_key == "caption" and loaded.dtype == torch.float32 and not loaded.model.training
    assert loaded.scale_factor == pipe.scale_factor and loaded.image_size == pipe.image_size == 16
    # the run was written from the in-memory system: loading it strictly gives back the very same images
    assert torch.equal(loaded.generate_tensors(PROMPTS, seed=5, **FAST), pipe.generate_tensors(PROMPTS, seed=5, **FAST))


def test_generate_gives_the_requested_images(pipe):
    result = pipe.generate(PROMPTS + PROMPTS[:1], seed=5, batch_size=2, **FAST)
    assert len(result.images) == 3 and result.seeds == [5, 6, 7]
    assert all(im.size == (16, 16) and im.mode == "RGB" for im in result.images)
    assert [im.info["seed"] for im in result.images] == [5, 6, 7]
    assert result.settings["height"] == 16 and result.settings["sampler"] == "euler"
    parts = list(pipe.iter_generate(PROMPTS * 2, seed=1, batch_size=3, **FAST))  # one chunk at a time
    assert [p.seeds for p in parts] == [[1, 2, 3], [4]] and parts[1].conditions == PROMPTS[1:]
    wide = pipe(PROMPTS[0], height=8, width=24, **FAST)
    assert len(wide) == 1 and wide[0].size == (24, 8)


def test_seeds_reproduce_per_image_and_differ(pipe):
    a = pipe.generate_tensors(PROMPTS, seed=3, **FAST)
    b = pipe.generate_tensors(PROMPTS, seed=3, **FAST)
    c = pipe.generate_tensors(PROMPTS, seed=4, **FAST)
    assert torch.equal(a, b)
    assert (a - c).abs().amax() > 0.05
    # image 1 of the call (seed 3 + 1) is the same image drawn alone from seed 4, whatever the batching
    alone = pipe.generate_tensors(PROMPTS[1:], seed=4, **FAST)
    chunked = pipe.generate_tensors(PROMPTS, seed=3, batch_size=1, **FAST)
    torch.testing.assert_close(alone[0], a[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(chunked, a, atol=1e-4, rtol=0)
    # a stochastic sampler's noise is seeded per chunk: one image per chunk reproduces alone too
    ancestral = dict(steps=3, sampler="euler_a", batch_size=1)
    torch.testing.assert_close(pipe.generate_tensors(PROMPTS, seed=3, **ancestral)[1],
                               pipe.generate_tensors(PROMPTS[1:], seed=4, **ancestral)[0], atol=1e-4, rtol=0)


def test_ddim_eta_zero_is_deterministic_and_eta_adds_noise(pipe):
    ddim = dict(steps=4, sampler="ddim")
    zero = pipe.generate_tensors(PROMPTS, seed=1, eta=0.0, **ddim)
    # η = 0 draws no noise: the same images whatever the sampler's generator (seeded per chunk)
    torch.testing.assert_close(pipe.generate_tensors(PROMPTS, seed=1, eta=0.0, batch_size=1, **ddim), zero,
                               atol=1e-4, rtol=0)
    noisy = pipe.generate_tensors(PROMPTS, seed=1, eta=1.0, **ddim)
    assert torch.equal(noisy, pipe.generate_tensors(PROMPTS, seed=1, eta=1.0, **ddim))
    assert (noisy - zero).abs().amax() > 0.05


def test_guidance_one_runs_only_the_conditional_branch(pipe):
    rows = []
    hook = pipe.model.diffusion_model.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    try:
        guided = pipe.generate_tensors(PROMPTS, seed=2, guidance=5.0, **FAST)
        assert rows == [4] * 3  # [uncond; cond] in one batch per step
        rows.clear()
        plain = pipe.generate_tensors(PROMPTS, seed=2, guidance=1.0, **FAST)
        assert rows == [2] * 3
    finally:
        hook.remove()
    # a negative prompt is the unconditional branch: unused at scale 1
    assert torch.equal(plain, pipe.generate_tensors(PROMPTS, seed=2, guidance=1.0, negative="blue", **FAST))
    assert (plain - guided).abs().amax() > 1e-5  # (the 6-step toy barely listens to its prompt)
    # the conditional-only path written out: seeded noise → Euler on D(x, σ | prompt) → unscale → decode
    denoiser = Denoiser(pipe.model, pipe.schedule, pipe.parameterization)
    context = pipe.encode(PROMPTS)
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(2 + i)) for i in range(2)])
    latents = sample("euler", lambda x, s: denoiser(x, s, context=context), noise, pipe.schedule, 3).x
    torch.testing.assert_close(plain, pipe.decode(latents), atol=1e-5, rtol=0)


def test_ema_and_raw_weights_differ(loaded, toy_ldm_run):
    pipe = loaded
    raw = Pipeline.from_run(toy_ldm_run, device="cpu", use_ema=False)
    assert raw.source["ema"] is False
    name, param = next(iter(pipe.model.named_parameters()))
    state = torch.load(toy_ldm_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(param, state["model_ema." + name.replace(".", "")])
    assert torch.equal(dict(raw.model.named_parameters())[name], state["model." + name])
    assert not torch.equal(param, dict(raw.model.named_parameters())[name])
    a, b = pipe.generate_tensors(PROMPTS, seed=0, **FAST), raw.generate_tensors(PROMPTS, seed=0, **FAST)
    assert (a - b).abs().amax() > 1e-3


def test_bf16_is_close_to_fp32(pipe, toy_ldm_run):
    half = Pipeline.from_run(toy_ldm_run, device="cpu", dtype="bf16")
    assert half.dtype == torch.bfloat16 and next(half.cond_stage_model.parameters()).dtype == torch.float32
    a, b = pipe.generate_tensors(PROMPTS, seed=0, **FAST), half.generate_tensors(PROMPTS, seed=0, **FAST)
    assert b.dtype == torch.float32 and (a - b).abs().mean() < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_matches_cpu(pipe, toy_ldm_run):
    gpu = Pipeline.from_run(toy_ldm_run, device="cuda", dtype="bf16")
    assert gpu.device.type == "cuda"
    a, b = pipe.generate_tensors(PROMPTS, seed=0, **FAST), gpu.generate_tensors(PROMPTS, seed=0, **FAST)
    assert b.device.type == "cpu" and (a - b).abs().mean() < 0.02


def test_class_model_takes_labels(pipe):
    labels = tiny_pipeline("class")
    assert labels.condition_key == "label" and labels.n_classes == 168
    images = labels([3, 5, 167], negative=0, **FAST)
    assert len(images) == 3 and images[0].size == (16, 16)
    for bad, match in ((["a circle"], "integer class labels"), ([168], "out of range"), ([-1], "out of range")):
        with pytest.raises(PipelineError, match=match):
            labels(bad, **FAST)
    with pytest.raises(PipelineError, match="text-conditional"):
        pipe([3], **FAST)


@pytest.mark.parametrize("options, match", [
    (dict(steps=0), "steps must be at least 1"),
    (dict(guidance=-1.0), "guidance scale must be"),
    (dict(sampler="plms"), "unknown sampler"),
    (dict(sampler="dpmpp_2m", eta=0.5), "takes no option 'eta'"),
    (dict(height=15), "not a positive multiple of 4 \\(the VAE's factor 2 × the U-Net's downsampling 2\\)"),
    (dict(height=18, width=16), "16×18 \\(width×height\\) is not a positive multiple of 4"),  # on the VAE's grid only
    (dict(batch_size=0), "batch size"),
    (dict(negative=["a", "b", "c"]), "3 negative conditions for 2 images"),
])
def test_bad_requests_are_user_errors(pipe, options, match):
    with pytest.raises(PipelineError, match=match):
        pipe(PROMPTS, **{**FAST, **options})


def test_runs_that_are_not_stage2_are_refused(toy_vae_run, toy_ldm_run, tmp_path):
    with pytest.raises(NotAnLDMRunError, match="is not a stage-2"):
        Pipeline.from_run(toy_vae_run)
    with pytest.raises(RunError, match="run not found"):
        Pipeline.from_run(tmp_path / "missing")
    summary = describe_run(toy_ldm_run / "checkpoints" / "last.ckpt")  # a .ckpt inside a run names it too
    assert summary.run_dir == toy_ldm_run.resolve() and summary.downsampling_factor == 2


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run.resolve(), dest, ignore=shutil.ignore_patterns("samples", "step*.ckpt"))
    return dest


def test_gone_vae_run_and_unfit_checkpoint_are_clear(toy_ldm_run, tmp_path):
    gone = copy_run(toy_ldm_run, tmp_path / "gone")
    cfg = yaml.safe_load((gone / "config.yaml").read_text())
    cfg["model"]["params"]["first_stage"] = str(tmp_path / "deleted-vae-run")
    (gone / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(RunError, match="the VAE run .*deleted-vae-run.* is gone"):
        Pipeline.from_run(gone)

    unfit = copy_run(toy_ldm_run, tmp_path / "unfit")
    ckpt = torch.load(unfit / "checkpoints" / "last.ckpt", weights_only=True)
    del ckpt["state_dict"]["first_stage_model.decoder.conv_out.weight"]
    torch.save(ckpt, unfit / "checkpoints" / "last.ckpt")
    with pytest.raises(CheckpointError, match="missing: first_stage_model.decoder.conv_out.weight") as info:
        Pipeline.from_run(unfit)
    assert isinstance(info.value, UserError)
