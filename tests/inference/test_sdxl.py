"""SDXL base: the model of configs/sd/xl-base-inference.yaml has the public file's every key and shape; a toy file
in the public layout (fp16, generative-models' names) loads strictly; its U-Net, conditioner and whole pipeline equal
diffusers' (built from the same file by diffusers' single-file converters) for the same noise and sampler."""

import json
import shlex

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.inference.pipeline import Pipeline, PipelineError, guess_sd_config
from ldm.inference.sd import SD_CONFIG_DIR, build_sd, load_sd
from ldm.io.checkpoints import FILLED_KEYS, CheckpointError
from ldm.io.sdxl_layout import model_to_sdxl, sdxl_to_model
from ldm.nets.conditioning.sdxl import SizeConditioning
from tests.paths import REPO_ROOT
from tests.sdxl_toy import diffusers_xl_pipeline, tiny_xl_config, write_xl_file
from tests.nets.test_reference_unet import _reference

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red circle on a blue background", "a green square"]
SDXL_TENSORS = 1680 + 587 + 248  # U-Net + text encoders + VAE (shared/reference/README.md)


def _noise(seed: int, n: int) -> torch.Tensor:
    """The Pipeline's noise: image j from its own generator seeded seed + j (toy latents: 4 × 8 × 8)."""
    return torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(seed + j)) for j in range(n)])


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """(toy SDXL file, its config, our Pipeline, diffusers' StableDiffusionXLPipeline) from the same file."""
    folder = tmp_path_factory.mktemp("sdxl")
    ckpt, config = write_xl_file(folder)
    ours = Pipeline.from_checkpoint(ckpt, config)
    theirs = diffusers_xl_pipeline(load_file(str(ckpt)), tiny_xl_config(), folder)
    return ckpt, config, ours, theirs


def test_the_config_builds_every_key_and_shape_of_the_public_file():
    model = build_sd(SD_CONFIG_DIR / "xl-base-inference.yaml", on_meta=True)
    state = {k: v for k, v in model.state_dict().items() if k not in FILLED_KEYS}
    assert all(t.is_meta for t in state.values())  # nothing allocated
    public = {k: list(v.shape) for k, v in model_to_sdxl(state).items()}
    assert len(public) == SDXL_TENSORS
    references = [_reference(f) for f in ("sdxl_unet.json", "sdxl_text_encoders.json", "sd_vae.json")]
    if None in references:
        pytest.skip("reference layouts not found")  # pragma: no cover
    expected = {k: s for r in references for k, s in r["shapes"].items()}
    assert sorted(set(expected) - set(public)) == [] and sorted(set(public) - set(expected)) == []
    assert {k: s for k, s in public.items() if expected[k] != s} == {}
    unet = model.model.diffusion_model
    assert sum(p.numel() for p in unet.parameters()) == references[0]["parameters"]
    assert model.cond_stage_model.context_dim == 2048 and model.cond_stage_model.adm_dim == 2816


def test_toy_file_loads_strictly_and_its_config_is_guessed(xl, tmp_path):
    ckpt, config, ours, _ = xl
    state = load_file(str(ckpt))
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())  # as the public file
    system = load_sd(config, ckpt)
    info = system.checkpoint_info
    assert info["text_encoder"] == "sdxl" and not info["ema"]  # (the toy's context is too narrow to name a version)
    assert "cond_stage_model.embedders.0.model.text_projection" in info["filled"]
    mapped, hf = sdxl_to_model(state)
    assert hf == [0] and set(model_to_sdxl(mapped)) == set(state)  # the layouts map both ways, nothing lost
    assert guess_sd_config(ckpt) == SD_CONFIG_DIR / "xl-base-inference.yaml"
    odd = tmp_path / "odd.safetensors"  # one tensor too many, one short: the report names both
    save_file({**{k: v for k, v in state.items() if "label_emb.0.2.bias" not in k},
               "conditioner.embedders.1.model.extra": torch.zeros(1)}, str(odd))
    with pytest.raises(CheckpointError) as refused:
        load_sd(config, odd)
    assert "unexpected: cond_stage_model.embedders.1.model.extra" in str(refused.value)
    assert "missing: model.diffusion_model.label_emb.0.2.bias" in str(refused.value)


def test_unet_equals_diffusers_with_the_adm_vector(xl):
    _, _, ours, theirs = xl
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999.0, 17.5])
    sizes = torch.tensor([[16.0, 16, 0, 0, 16, 16], [1024, 768, 32, 8, 512, 512]])  # (B, 6): original, crop, target
    cond = ours.cond_stage_model.conditioning(PROMPTS, dict(zip(("original_size", "crop_top_left", "target_size"),
                                                                 sizes.split(2, dim=1))))
    pooled = cond["y"][:, :1280]
    with torch.no_grad():
        out = ours.model.diffusion_model(x, t, context=cond["context"], y=cond["y"])  # (2, 4, 8, 8)
        ref = theirs.unet(x, t, cond["context"], added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes},
                          return_dict=False)[0]
        other = ours.model.diffusion_model(x, t, context=cond["context"], y=torch.flip(cond["y"], [0]))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, other, atol=1e-3)  # y matters
    with pytest.raises(ValueError, match="ADM vector"):
        ours.model.diffusion_model(x, t, context=cond["context"], y=cond["y"][:, :100])


def test_conditioner_equals_diffusers_encode_prompt_and_time_ids(xl):
    _, _, ours, theirs = xl
    sizes = SizeConditioning.for_size(16, 16, original_size=(1024, 768), crop_top_left=(32, 8))
    cond = ours.conditioning(PROMPTS, sizes)
    uncond = ours.cond_stage_model.unconditional_conditioning(2, sizes)
    embeds, negative, pooled, negative_pooled = theirs.encode_prompt(PROMPTS, device="cpu",
                                                                     do_classifier_free_guidance=True)
    torch.testing.assert_close(cond["context"], embeds, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(negative) == 0 == torch.count_nonzero(negative_pooled)  # force_zeros_for_empty_prompt
    torch.testing.assert_close(uncond["context"], negative)
    time_ids = theirs._get_add_time_ids((1024, 768), (32, 8), (16, 16), dtype=torch.float32,
                                        text_encoder_projection_dim=1280)  # (1, 6)
    size_embeds = theirs.unet.add_time_proj(time_ids.flatten()).reshape(1, -1)  # (1, 6 · 256)
    diffusers_y = torch.cat([pooled, size_embeds.expand(2, -1)], 1)
    torch.testing.assert_close(cond["y"], diffusers_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uncond["y"][:, 1280:], diffusers_y[:, 1280:])
    assert torch.count_nonzero(uncond["y"][:, :1280]) == 0


MICRO = {"original_size": (512, 384), "crop_top_left": (8, 0), "target_size": (16, 16)}


@pytest.mark.parametrize("negative, sizes", [(None, {}), ("blurry", MICRO)])
def test_pipeline_equals_diffusers_sdxl_pipeline(xl, negative, sizes):
    _, _, ours, theirs = xl
    images = ours.generate_tensors(PROMPTS, steps=2, guidance=5.0, sampler="euler", seed=3, height=16, width=16,
                                   negative=negative, **sizes)  # (2, 3, 16, 16) in [-1, 1]
    ref = theirs(prompt=PROMPTS, negative_prompt=negative and [negative] * 2, height=16, width=16,
                 num_inference_steps=2, guidance_scale=5.0, latents=_noise(3, 2), output_type="pt",
                 original_size=sizes.get("original_size"), crops_coords_top_left=sizes.get("crop_top_left", (0, 0)),
                 target_size=sizes.get("target_size")).images  # (2, 3, 16, 16) in [0, 1]
    assert ref.std() > 0.05
    torch.testing.assert_close(images * 0.5 + 0.5, ref, rtol=0, atol=1e-4)


def test_heun_equals_diffusers_heun_scheduler_with_sdxl_settings(xl):
    _, _, ours, theirs = xl
    from diffusers import HeunDiscreteScheduler

    euler = theirs.scheduler
    theirs.scheduler = HeunDiscreteScheduler.from_config(euler.config)  # leading spacing, steps_offset 1
    try:
        ref = theirs(prompt=PROMPTS, height=16, width=16, num_inference_steps=2, guidance_scale=5.0,
                     latents=_noise(3, 2), output_type="pt").images
    finally:
        theirs.scheduler = euler
    images = ours.generate_tensors(PROMPTS, steps=2, guidance=5.0, sampler="heun", seed=3)  # a 2nd-order step, a last
    torch.testing.assert_close(images * 0.5 + 0.5, ref, rtol=0, atol=1e-4)


def test_every_sampler_draws_and_sizes_change_the_image(xl):
    _, _, ours, _ = xl
    from ldm.diffusion import SAMPLERS

    base = ours.generate_tensors(PROMPTS[:1], steps=1, sampler="euler", seed=1)
    assert base.shape == (1, 3, 16, 16)  # the config's image size
    moved = ours.generate_tensors(PROMPTS[:1], steps=1, sampler="euler", seed=1, crop_top_left=(64, 64))
    assert not torch.allclose(base, moved)
    for sampler in SAMPLERS:  # guidance 1: the conditional branch only (guidance is the denoiser's, not the sampler's)
        out = ours.generate_tensors(PROMPTS[:1], steps=3, sampler=sampler, seed=1, guidance=1.0)
        assert torch.isfinite(out).all(), sampler
    with pytest.raises(PipelineError, match="crop_top_left must be two non-negative integers"):
        ours.generate_tensors(PROMPTS[:1], steps=1, crop_top_left=(1, 2, 3))
    assert ours.schedule.default_spacing("dpmpp_2m") == "leading" and ours.schedule.vp_start


def test_sd1_refuses_size_conditioning():
    from tests.sd_toy import shared_tiny_system

    pipe = Pipeline.from_system(shared_tiny_system("v1-inference"))  # only read: refused before drawing
    with pytest.raises(PipelineError, match="takes no size conditioning \\(original_size\\)"):
        pipe.generate_tensors(["a box"], steps=1, original_size=(16, 16))
    assert json.dumps(pipe.source) == "{}"


def test_readme_sdxl_command_and_size_options_on_the_command_line(xl, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from tests.scripts import load_script
    from tests.test_readme import readme_commands, run_command, smoke_arguments

    ckpt, config, _, _ = xl
    (command,) = [c for c in readme_commands()  # the plain sampling command (not the LoRA one)
                  if "txt2img.py --ckpt sd_xl_base_1.0.safetensors" in c and "--lora" not in c]
    monkeypatch.chdir(tmp_path)
    for name in ("configs", "scripts"):
        (tmp_path / name).symlink_to(REPO_ROOT / name)
    (tmp_path / "sd_xl_base_1.0.safetensors").symlink_to(ckpt)
    (tmp_path / "toy-sdxl.yaml").symlink_to(config)
    words = shlex.split(command)[1:]
    run_command(words + smoke_arguments(words))  # the README's command, at toy size
    assert len(list((tmp_path / "outputs" / "sdxl").glob("*.png"))) == 1
    txt2img = load_script("txt2img")
    args = ["--ckpt", ckpt, "--config", config, "--prompt", "a green square", "--steps", "2", "--sampler", "euler",
            "--seed", "5", "--original-size", "512", "384", "--crop-top-left", "8", "0", "--out", tmp_path / "cli"]
    assert txt2img.main([str(a) for a in args]) == 0, capsys.readouterr().err
    (png,) = [p for p in (tmp_path / "cli").glob("*.png") if "grid" not in p.name]
    meta = json.loads(Image.open(png).text["ldm"])
    assert meta["original_size"] == [512, 384] and meta["crop_top_left"] == [8, 0] and meta["height"] == 16
    assert meta["target_size"] == [16, 16]  # not given: the image size (recorded, so the PNG redraws as drawn)
