"""Image-to-image and inpainting through the Pipeline and txt2img.py on toy runs (ε and flow), ControlNet runs too.

Strength 0 is the init image encoded and decoded, strength 1 text-to-image from the same seed; inpainting keeps the
unmasked region within the decoder's error (the kept latent cells are the init image's exactly).
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.core.images import from_pil
from ldm.inference.draw import draw_latents
from ldm.inference.edit_images import EditImageError
from ldm.inference.pipeline import GenerationRequest, Pipeline, PipelineError
from tests.components import shared_run_pipeline
from tests.scripts import load_script
from tests.inference.test_pipeline_control import edges, runs  # noqa: F401  (module fixtures shared)
from tests.inference.test_txt2img import pngs

txt2img = load_script("txt2img")
PROMPT = "a red circle on a blue background"
PIXELS = 16
FAST = dict(steps=4, sampler="euler", guidance=3.0)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """(an init image, a mask repainting its right half, a mask of another size), as PNG files."""
    root = tmp_path_factory.mktemp("edit-inputs")
    g = np.random.default_rng(1)
    Image.fromarray(g.integers(0, 256, (PIXELS, PIXELS, 3), dtype=np.uint8)).save(root / "init.png")
    mask = np.zeros((PIXELS, PIXELS), dtype=np.uint8)
    mask[:, PIXELS // 2:] = 255
    Image.fromarray(mask, mode="L").save(root / "mask.png")
    Image.fromarray(mask[:8], mode="L").save(root / "small-mask.png")
    return root / "init.png", root / "mask.png", root / "small-mask.png"


@pytest.fixture(scope="module", params=["eps", "flow"])
def pipe(request, toy_ldm_run, toy_flow_run):
    return shared_run_pipeline(toy_ldm_run if request.param == "eps" else toy_flow_run)  # read only


def reconstruction(pipe: Pipeline, path) -> torch.Tensor:
    """The init image encoded (posterior mean) and decoded: (1, 3, H, W) in [-1, 1]."""
    with torch.no_grad():
        z = pipe.first_stage_model.encode(from_pil(Image.open(path))[None]).mode() * pipe.scale_factor
        return pipe.decode(z)


def test_strength_zero_is_the_picture_decoded_and_one_is_text_to_image(pipe, pictures):
    init = pictures[0]
    none = pipe.generate_tensors([PROMPT, PROMPT], seed=3, init_image=init, strength=0.0, **FAST)
    torch.testing.assert_close(none, reconstruction(pipe, init).expand(2, -1, -1, -1), atol=1e-5, rtol=0)
    full = pipe.generate_tensors([PROMPT], seed=3, init_image=init, strength=1.0, **FAST)
    assert torch.equal(full, pipe.generate_tensors([PROMPT], seed=3, **FAST))
    half = pipe.generate_tensors([PROMPT], seed=3, init_image=init, strength=0.5, **FAST)
    assert (half - full).abs().mean() > 0.01 and (half - none[:1]).abs().mean() > 0.01


def test_a_request_object_and_its_png_parameters(pipe, pictures):
    init, mask, _ = pictures
    request = GenerationRequest([PROMPT], seed=5, steps=2, sampler="ddim", sampler_options={"eta": 0.0},
                                init_image=str(init), strength=0.6, mask=str(mask))
    generation = pipe.generate(request)
    (params,) = generation.parameters
    assert params["init_image"] == str(init) and params["mask"] == str(mask) and params["strength"] == 0.6
    assert params["seed"] == 5 and params["eta"] == 0.0 and params["prompt"] == PROMPT
    assert generation.images[0].size == (PIXELS, PIXELS) and generation.settings["strength"] == 0.6


def test_inpainting_keeps_the_unmasked_region_within_decoder_error(pipe, pictures):
    init, mask, _ = pictures
    plan = pipe.check(GenerationRequest([PROMPT] * 2, seed=1, init_image=init, mask=mask, **FAST))
    latents = draw_latents(pipe, plan, plan.conditions, None, None, plan.edit, 1, None)  # (2, C, h, w)
    with torch.no_grad():
        known = pipe.first_stage_model.encode(plan.edit.image).mode() * pipe.scale_factor  # (1, C, h, w)
    half = PIXELS // 4  # latent columns left of the mask (f = 2)
    torch.testing.assert_close(latents[..., :half], known[..., :half].expand(2, -1, -1, -1), atol=1e-5, rtol=0)
    assert (latents[..., half:] - known[..., half:]).abs().mean() > 0.1  # the masked half is redrawn

    out = pipe.decode(latents)  # the tiny decoder attends globally: every latent cell touches every pixel
    x, recon = from_pil(Image.open(init))[None], reconstruction(pipe, init)
    left, right = slice(0, PIXELS // 2), slice(PIXELS // 2, PIXELS)
    kept, decoder = ((a[..., left] - x[..., left]).abs().mean() for a in (out, recon))
    assert kept <= 1.1 * decoder  # the kept half is the picture within the decoder's own error
    assert (out[..., right] - recon[..., right]).abs().mean() > (out[..., left] - recon[..., left]).abs().mean()
    torch.testing.assert_close(out, pipe.generate_tensors([PROMPT] * 2, seed=1, init_image=init, mask=mask, **FAST),
                               atol=1e-5, rtol=0)


def test_inpainting_with_a_controlnet_run(runs, edges, pictures):  # noqa: F811
    init, mask, _ = pictures
    pipe = shared_run_pipeline(runs[1])  # read only
    plan = pipe.check(GenerationRequest([PROMPT], control=edges, init_image=init, mask=mask, **FAST))
    latents = draw_latents(pipe, plan, plan.conditions, None, plan.control, plan.edit, 0, None)
    with torch.no_grad():
        known = pipe.first_stage_model.encode(plan.edit.image).mode() * pipe.scale_factor
    torch.testing.assert_close(latents[..., : PIXELS // 4], known[..., : PIXELS // 4], atol=1e-5, rtol=0)


def test_editing_requests_that_do_not_fit_are_refused(pipe, pictures):
    init, mask, small = pictures
    with pytest.raises(EditImageError, match="the mask is 16×8 pixels but the init image is 16×16"):
        pipe.generate_tensors([PROMPT], init_image=init, mask=small, **FAST)
    with pytest.raises(PipelineError, match="strength must be in"):
        pipe.generate_tensors([PROMPT], init_image=init, strength=1.5, **FAST)
    with pytest.raises(PipelineError, match="the mask needs the init image"):
        pipe.generate_tensors([PROMPT], mask=mask, **FAST)
    with pytest.raises(PipelineError, match="cannot read the init image"):
        pipe.generate_tensors([PROMPT], init_image=mask.parent / "missing.png", **FAST)


def test_init_image_sets_the_default_size(pipe, tmp_path):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (25, 9), (200, 10, 10)).save(wide)
    (image,) = pipe([PROMPT], init_image=wide, strength=0.5, **FAST)
    assert image.size == (24, 8)  # cut down to the VAE's grid (factor 2)


def test_txt2img_init_and_mask(toy_ldm_run, pictures, tmp_path, capsys):
    init, mask, small = pictures
    out = tmp_path / "out"
    argv = ["--run", str(toy_ldm_run), "--prompt", "a box", "--seed", "2", "--out", str(out), "--steps", "2",
            "--sampler", "euler", "--init", str(init)]
    assert txt2img.main(argv + ["--strength", "0.5"]) == 0
    assert txt2img.main(argv + ["--mask", str(mask)]) == 0
    first, second = (Image.open(out / name) for name in pngs(out))
    meta = json.loads(first.text["ldm"])
    assert meta["init_image"] == str(init) and meta["strength"] == 0.5 and meta["mask"] is None
    assert "Denoising strength: 0.5" in first.text["parameters"]
    assert json.loads(second.text["ldm"])["strength"] == 1.0 and json.loads(second.text["ldm"])["mask"] == str(mask)
    assert "init: " in capsys.readouterr().out
    for extra, message in ((["--strength", "2"], "--strength must be in [0, 1]"),
                           (["--mask", str(small)], "--mask is 16×8 pixels but --init is 16×16"),
                           (["--init", str(tmp_path / "none.png")], "cannot read --init")):
        assert txt2img.main(argv + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert txt2img.main(argv[:-2] + ["--mask", str(mask)]) == 2
    assert "--mask needs --init IMAGE" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["v1-inference", "v2-inference-v"])  # ε and v public files
def test_img2img_from_public_files(name, pictures, tmp_path):
    from tests.sd_toy import write_sd_file

    ckpt, config = write_sd_file(tmp_path, name, seed=2)
    pipe = Pipeline.from_checkpoint(ckpt, config, device="cpu")
    init = pictures[0]
    none = pipe.generate_tensors([PROMPT], seed=4, init_image=init, strength=0.0, **FAST)
    torch.testing.assert_close(none, reconstruction(pipe, init), atol=1e-5, rtol=0)
    full = pipe.generate_tensors([PROMPT], seed=4, init_image=init, strength=1.0, **FAST)
    assert torch.equal(full, pipe.generate_tensors([PROMPT], seed=4, **FAST))
    generation = pipe.generate(GenerationRequest([PROMPT], seed=4, init_image=str(init), strength=0.5, **FAST))
    assert generation.parameters[0]["checkpoint"] == str(ckpt) and generation.parameters[0]["strength"] == 0.5
