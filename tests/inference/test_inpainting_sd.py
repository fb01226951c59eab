"""Public SD inpainting files (sd-v1-5-inpainting: a U-Net of 9 input channels) at toy size: loaded strictly with
configs/sd/v1-inpainting-inference.yaml, guessed from the file, used natively (mask and masked-image latents joined
to the noisy latents) and equal to diffusers' StableDiffusionInpaintPipeline; with a ControlNet too."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.core.config import save_config
from ldm.inference.pipeline import Pipeline
from ldm.inference.sd import CONTEXT_KEY, INPUT_KEY, SD_CONFIG_DIR, guess_sd_config
from ldm.io.checkpoints import CheckpointError
from tests.sd_toy import PIXELS, public_state, randomize, shared_file_pipeline, tiny_config, tiny_system

NAME = "v1-inpainting-inference"
PROMPT = "a red box"
STEPS = 4  # linspace(0, 999, 4) lands on integer timesteps: diffusers' Euler and ours visit the same table σ
GUIDANCE = 3.0
TOLERANCE = 1e-4  # measured 2.3e-6 (float32 on a CPU)


def deterministic_vae(system) -> None:
    """A VAE whose posterior has (almost) no spread, so diffusers' posterior draw equals our posterior mean."""
    quant = system.first_stage_model.quant_conv
    half = quant.out_channels // 2
    with torch.no_grad():
        quant.weight[half:] = 0
        quant.bias[half:] = -100  # log-variance clamped to −30: std 3e-7


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(toy inpainting file, its config, a ControlNet file for it, an init image, a mask)."""
    root = tmp_path_factory.mktemp("sd-inpainting")
    system = tiny_system(NAME, seed=5)
    deterministic_vae(system)
    assert system.model.diffusion_model.in_channels == 9
    save_file({k: v.contiguous() for k, v in public_state(system, ema_seed=None).items()}, root / "inpaint.safetensors")
    save_config(tiny_config(NAME), root / "inpaint.yaml")
    control = tiny_system("controlnet-v1", seed=6).control_model
    randomize(control, 7, scale=0.2)
    save_file({f"control_model.{k}": v.contiguous() for k, v in control.state_dict().items()},
              root / "control.safetensors")
    g = np.random.default_rng(0)
    Image.fromarray(g.integers(0, 256, (PIXELS, PIXELS, 3), dtype=np.uint8)).save(root / "init.png")
    mask = np.zeros((PIXELS, PIXELS), dtype=np.uint8)
    mask[4:12, 6:14] = 255  # repaint a box
    Image.fromarray(mask, mode="L").save(root / "mask.png")
    return root / "inpaint.safetensors", root / "inpaint.yaml", root / "control.safetensors", root / "init.png", \
        root / "mask.png"


def test_the_config_builds_the_sd15_layout_with_nine_input_channels():
    from ldm.inference.sd import build_sd

    ours = {k: list(v.shape) for k, v in build_sd(SD_CONFIG_DIR / f"{NAME}.yaml", on_meta=True).state_dict().items()}
    plain = {k: list(v.shape) for k, v in build_sd(SD_CONFIG_DIR / "v1-inference.yaml", on_meta=True).state_dict().items()}
    assert ours.keys() == plain.keys() and ours[INPUT_KEY] == [320, 9, 3, 3]
    assert {k for k in ours if ours[k] != plain[k]} == {INPUT_KEY}


def test_the_file_loads_strictly_and_declares_inpainting(files):
    ckpt, config, *_ = files
    pipe = shared_file_pipeline(ckpt, config)  # read only
    assert pipe.capabilities.inpainting and pipe.capabilities.latent_channels == 4
    plain = tiny_config("v1-inference")
    with pytest.raises(CheckpointError, match="v1-inpainting-inference.yaml"):
        Pipeline.from_checkpoint(ckpt, plain, device="cpu")


def test_the_config_is_guessed_from_the_input_channels(tmp_path):
    for channels, expected in ((9, NAME), (4, "v1-inference")):
        path = tmp_path / f"in{channels}.safetensors"
        save_file({CONTEXT_KEY: torch.zeros(1, 768), INPUT_KEY: torch.zeros(1, channels, 1, 1)}, path)
        assert guess_sd_config(path).stem == expected


def test_inpainting_equals_diffusers_inpaint_pipeline(files):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from ldm.bench.twins import diffusers_text_encoder_like, diffusers_unet_like, diffusers_vae_like

    ckpt, config, _, init, mask = files
    pipe = shared_file_pipeline(ckpt, config)  # read only
    params = tiny_config(NAME)["model"]["params"]
    vae_params = params["first_stage"]["params"]
    theirs = diffusers.StableDiffusionInpaintPipeline(
        vae=diffusers_vae_like(pipe.first_stage_model, vae_params["ddconfig"], vae_params["embed_dim"]).eval(),
        text_encoder=diffusers_text_encoder_like(pipe.cond_stage_model).eval(), tokenizer=None,
        unet=diffusers_unet_like(pipe.model.diffusion_model, params["unet"]["params"]).eval(),
        scheduler=diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                   timestep_spacing="linspace"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    seed = 11
    noise = torch.randn((4, PIXELS // 2, PIXELS // 2), generator=torch.Generator().manual_seed(seed))[None]
    with torch.no_grad():
        context, null = pipe.encode([PROMPT]), pipe.encode([""])
        expected = theirs(prompt_embeds=context, negative_prompt_embeds=null, image=Image.open(init),
                          mask_image=Image.open(mask), height=PIXELS, width=PIXELS, num_inference_steps=STEPS,
                          guidance_scale=GUIDANCE, latents=noise.clone(), output_type="pt").images  # (1, 3, H, W)
    ours = pipe.generate_tensors([PROMPT], steps=STEPS, sampler="euler", guidance=GUIDANCE, seed=seed,
                                 init_image=init, mask=mask)
    assert expected.shape == ours.shape == (1, 3, PIXELS, PIXELS)
    assert (ours - pipe.generate_tensors([PROMPT], steps=STEPS, sampler="euler", guidance=GUIDANCE, seed=seed)
            ).abs().amax() > 0.01  # the mask and the masked picture matter
    torch.testing.assert_close((ours + 1) / 2, expected.float(), atol=TOLERANCE, rtol=0)


def test_an_inpainting_file_with_a_controlnet(files):
    ckpt, config, control, init, mask = files
    pipe = Pipeline.from_checkpoint(ckpt, config, controlnet=control, device="cpu")
    assert pipe.capabilities.inpainting and pipe.capabilities.control
    settings = dict(steps=2, sampler="euler", guidance=GUIDANCE, seed=0, init_image=init, mask=mask)
    off = pipe.generate_tensors([PROMPT], control=init, control_scale=0.0, **settings)
    on = pipe.generate_tensors([PROMPT], control=init, control_scale=1.0, **settings)
    plain = shared_file_pipeline(ckpt, config).generate_tensors([PROMPT], **settings)
    torch.testing.assert_close(off, plain, atol=1e-5, rtol=0)
    assert (on - off).abs().amax() > 0.01
