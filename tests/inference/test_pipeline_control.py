"""Pipeline with a ControlNet: a toy ControlNet run (tiny LDM + ControlNet.from_unet) and toy SD files.

The runs are written from in-memory toy components (tests/components.py; random weights, no training): a
stage-2 run and a ControlNet run whose U-Net, VAE and text encoder are the same tensors.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.inference.control_image import ControlImageError, prepare_hints
from ldm.inference.pipeline import Pipeline, PipelineError, describe_run
from ldm.io.checkpoints import CONTROL_PREFIX
from tests.components import wake_zero_convs as wake_control
from tests.components import shared_run_pipeline, write_control_run
from tests.sd_toy import public_state, randomize, tiny_config, tiny_system

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]
FAST = dict(steps=2, sampler="euler", guidance=3.0)
PIXELS = 16  # the tiny configs' image size (f = 2 → 8×8 latents)


@pytest.fixture(scope="module")
def runs(toy_ldm_run, toy_vae_run, tmp_path_factory):
    """(stage-2 run, ControlNet run): the toy text run, and a ControlNet run on it whose ControlNet is copied from its
    (EMA) U-Net with the zero convolutions still zero."""
    control = write_control_run(tmp_path_factory.mktemp("control-runs"), toy_ldm_run, toy_vae_run, trained=False)
    return toy_ldm_run, control


@pytest.fixture(scope="module")
def base(runs):
    return shared_run_pipeline(runs[0])  # read only


@pytest.fixture(scope="module")
def controlled(runs):
    return shared_run_pipeline(runs[1])  # read only


@pytest.fixture(scope="module")
def edges(tmp_path_factory):
    """An edge map PNG of another size and mode (grey, 40×24) than the 16×16 output."""
    array = np.zeros((24, 40), dtype=np.uint8)
    array[4:20, 10] = array[4:20, 30] = array[4, 10:31] = array[19, 10:31] = 255  # a rectangle's outline
    path = tmp_path_factory.mktemp("hints") / "edges.png"
    Image.fromarray(array, mode="L").save(path)
    return path


def wake_zero_convs(pipe: Pipeline, seed: int = 1) -> None:
    """Make the zero convolutions (and the hint block's last one) nonzero, as a trained ControlNet's are."""
    wake_control(pipe.control_model, seed)


def test_controlnet_run_is_detected(runs, base, controlled):
    assert describe_run(runs[1]).controlnet and not describe_run(runs[0]).controlnet
    assert controlled.control_model is not None and base.control_model is None
    assert not controlled.control_model.training


def test_zero_initialised_control_gives_the_base_images(base, controlled, edges):
    plain = base.generate_tensors(PROMPTS, seed=0, **FAST)
    with_control = controlled.generate_tensors(PROMPTS, seed=0, control=edges, control_scale=1.0, **FAST)
    torch.testing.assert_close(with_control, plain, atol=1e-6, rtol=0)
    guess = controlled.generate_tensors(PROMPTS, seed=0, control=edges, guess_mode=True, **FAST)
    # guess mode runs the two CFG branches as two calls of batch B (the hint only in one), the base one call of
    # 2B: fp32 kernels differ by ~2e-6 between batch sizes
    torch.testing.assert_close(guess, plain, atol=1e-5, rtol=0)


def test_nonzero_control_changes_images_scale_zero_does_not(runs, base, edges):
    pipe = Pipeline.from_run(runs[1], device="cpu")
    wake_zero_convs(pipe)
    plain = base.generate_tensors(PROMPTS, seed=0, **FAST)
    one = pipe.generate_tensors(PROMPTS, seed=0, control=edges, **FAST)
    assert (one - plain).abs().amax() > 0.05
    torch.testing.assert_close(pipe.generate_tensors(PROMPTS, seed=0, control=edges, control_scale=0.0, **FAST),
                               plain, atol=1e-6, rtol=0)
    blank = Image.new("RGB", (PIXELS, PIXELS))
    # one hint per image (another hint, another image): image i drawn with hint i is image i of a call with that hint for every image
    per_image = pipe.generate_tensors(PROMPTS, seed=0, control=[edges, blank], **FAST)
    torch.testing.assert_close(per_image[0], one[0], atol=1e-5, rtol=0)
    assert (per_image[1] - one[1]).abs().amax() > 0.01


def test_guess_mode_controls_the_conditional_branch_only(runs, edges):
    pipe = Pipeline.from_run(runs[1], device="cpu")
    wake_zero_convs(pipe)
    calls = []
    hook = pipe.control_model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        normal = pipe.generate_tensors(PROMPTS, seed=0, control=edges, **FAST)
        assert calls == [4] * FAST["steps"]  # [uncond; cond] batched, both with the hint
        calls.clear()
        guess = pipe.generate_tensors(PROMPTS, seed=0, control=edges, guess_mode=True, **FAST)
        assert calls == [2] * FAST["steps"]  # the conditional half only
    finally:
        hook.remove()
    assert (guess - normal).abs().amax() > 1e-3
    settings = pipe.generate(PROMPTS[0], control=edges, guess_mode=True, control_scale=0.5, **{**FAST, "steps": 1}).settings
    assert settings["guess_mode"] is True and settings["control_scale"] == 0.5


def test_control_requests_that_do_not_fit_are_clear(base, controlled, edges):
    with pytest.raises(PipelineError, match="has no ControlNet"):
        base(PROMPTS, control=edges, **FAST)
    with pytest.raises(PipelineError, match="is a ControlNet: give a control image"):
        controlled(PROMPTS, **FAST)
    with pytest.raises(PipelineError, match="control scale must be"):
        controlled(PROMPTS, control=edges, control_scale=-1.0, **FAST)
    with pytest.raises(ControlImageError, match="3 control images for 2 images"):
        controlled(PROMPTS, control=[edges] * 3, **FAST)
    with pytest.raises(ControlImageError, match="cannot read the control image"):
        controlled(PROMPTS, control=edges.parent / "missing.png", **FAST)


def test_control_images_are_converted_and_resized(edges, controlled):
    grey = prepare_hints(edges, 1, 24, 8)
    assert grey.shape == (1, 3, 24, 8) and grey.min() >= 0 and grey.max() <= 1 and grey.max() > 0.5
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 0], grey[:, 2])  # L → RGB
    palette = Image.open(edges).convert("P")
    rgba = Image.open(edges).convert("RGBA")
    for image in (palette, rgba):  # any mode gives the same hint
        torch.testing.assert_close(prepare_hints(image, 1, PIXELS, PIXELS), prepare_hints(edges, 1, PIXELS, PIXELS),
                                   atol=0.02, rtol=0)
    assert prepare_hints(rgba.resize((4, 4)), 1, PIXELS, PIXELS).shape == (1, 3, PIXELS, PIXELS)  # enlarged
    tensor = prepare_hints(torch.rand(2, 3, 32, 32), 2, PIXELS, 8)
    assert tensor.shape == (2, 3, PIXELS, 8)
    wide = controlled(PROMPTS[0], control=rgba, height=8, width=24, **FAST)
    assert wide[0].size == (24, 8)


# ---------------------------------------------------------------------------------------------- public files


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    """A toy SD 1.x file and a ControlNet-only file (v1.1 style), as safetensors."""
    root = tmp_path_factory.mktemp("sd-files")
    system = tiny_system("controlnet-v1", seed=3)
    for i, part in enumerate(("zero_convs", "middle_block_out", "input_hint_block")):  # nonzero, as if trained
        randomize(getattr(system.control_model, part), 4 + i, scale=0.2)
    state = public_state(system, ema_seed=None)
    control = {k: v.contiguous() for k, v in state.items() if k.startswith(CONTROL_PREFIX)}
    sd = {k: v.contiguous() for k, v in state.items() if not k.startswith(CONTROL_PREFIX)}
    save_file(sd, root / "sd.safetensors")
    save_file(control, root / "control.safetensors")
    return root / "sd.safetensors", root / "control.safetensors"


def test_from_checkpoint_with_and_without_a_controlnet(sd_files, edges):
    sd, control = sd_files
    config = tiny_config("v1-inference")
    plain = Pipeline.from_checkpoint(sd, config, device="cpu")
    assert plain.control_model is None and plain.source["checkpoint"] == str(sd)
    with pytest.raises(PipelineError, match="has no ControlNet"):
        plain(PROMPTS, control=edges, **FAST)

    controlled = Pipeline.from_checkpoint(sd, config, controlnet=control, device="cpu")
    assert controlled.control_model is not None and controlled.source["controlnet"] == str(control)
    base = plain.generate_tensors(PROMPTS, seed=0, **FAST)
    assert base.shape == (2, 3, PIXELS, PIXELS)
    drawn = controlled.generate_tensors(PROMPTS, seed=0, control=edges, **FAST)
    assert (drawn - base).abs().amax() > 0.01
    torch.testing.assert_close(controlled.generate_tensors(PROMPTS, seed=0, control=edges, control_scale=0.0, **FAST),
                               base, atol=1e-5, rtol=0)
    with pytest.raises(PipelineError, match="is a ControlNet"):
        controlled(PROMPTS, **FAST)
