"""LoRA files from every common trainer on a toy SDXL file (and kohya's lora_te1_ on SD 1.x): made in the test with
peft on diffusers' own SDXL modules, saved by diffusers' save_lora_weights, converted by its convert_state_dict_to_kohya
and renamed into kohya's generative-models names, diffusers' training-script and attention-processor layouts; each
gives through Pipeline.with_lora the text context, pooled text and U-Net output diffusers' load_lora_weights gives for
the same file (and through txt2img --lora diffusers' image). Files for another model family are refused naming both
families."""

import copy
import functools
import re
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.inference.lora_files import num_res_blocks, read_lora_file, text_towers
from ldm.io.lora_layout import LoraFileError, diffusers_unet_path
from ldm.nets.conditioning.sdxl import SizeConditioning
from ldm.nets.lora import adaptable_modules
from tests.sd_toy import file_pipeline, lora_folded, shared_file_pipeline
from tests.sdxl_toy import diffusers_xl_pipeline, tiny_xl_config, write_xl_file

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

PROMPTS = ["a red circle on a blue background", "a green square"]
RANK, ALPHA = 4, 8  # alpha ≠ rank: only a file's metadata (or kohya's .alpha) can say so
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
DRAW = dict(steps=3, guidance=5.0, sampler="euler", seed=3)  # the one image compared (through txt2img --lora)
IMAGE_LAYOUT = "kohya_sgm"  # the file whose diffusers image txt2img --lora is compared with
SIZE = 16  # pixels: 8 × 8 latents
TOLERANCE = 1e-5  # fp32: max |Δ| of outputs of order 1
ADAPTER = "under-test"  # the name diffusers loads each file under


def _sd1():
    """A toy SD 1.x system, built once per test process for the tests that only read its modules."""
    from tests.sd_toy import shared_tiny_system

    return shared_tiny_system("v1-inference")


def _noise(seed: int, n: int) -> torch.Tensor:
    return torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(seed + j)) for j in range(n)])


def peft_layers(pipe, alpha: int) -> dict:
    """Random peft LoRA adapters on diffusers' U-Net and both text encoders; their state dicts by save argument."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=alpha, init_lora_weights=False, target_modules=UNET_TARGETS),
                            pipe.unet)
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=alpha, init_lora_weights=False,
                                           target_modules=TEXT_TARGETS), encoder)
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
            for name, param in module.named_parameters():
                if "lora_" in name:
                    param.mul_(0.3)  # an adapter that changes the images without swamping them
    return {"unet_lora_layers": get_peft_model_state_dict(pipe.unet),
            "text_encoder_lora_layers": get_peft_model_state_dict(pipe.text_encoder),
            "text_encoder_2_lora_layers": get_peft_model_state_dict(pipe.text_encoder_2)}


def renamed(state: dict, rename) -> dict:
    """``state`` with each key renamed (keys renamed to None dropped)."""
    out = {}
    for key, value in state.items():
        new = rename(key)
        if new is not None:
            out[new] = value
    return out


def training_script_key(key: str) -> str:
    """peft's names → diffusers' training scripts before peft (LoRALinearLayer)."""
    down, up = (".lora.down.weight", ".lora.up.weight") if key.startswith("unet.") else (
        ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")
    return key.replace(".lora_A.weight", down).replace(".lora_B.weight", up)


def processor_key(key: str) -> str | None:
    """peft's U-Net attention names → diffusers' attention processors' (bare U-Net keys); None for the rest."""
    match = re.match(r"unet\.(.+\.attn[12])\.(to_q|to_k|to_v|to_out)(?:\.0)?\.lora_([AB])\.weight$", key)
    return match and f"{match[1]}.processor.{match[2]}_lora.{'down' if match[3] == 'A' else 'up'}.weight"


@functools.cache
def _diffusers_base(ckpt, folder):
    """diffusers' pipeline of the toy file, built once per file through its single-file converters: LoRA files are
    loaded into it and deleted again (peft's layers then compute their own weights alone, exactly)."""
    return diffusers_xl_pipeline(load_file(str(ckpt)), tiny_xl_config(), folder)


@functools.cache
def _clean_parts(ckpt, folder) -> dict:
    """Copies of the base pipeline's networks made before any LoRA is loaded into it."""
    base = _diffusers_base(ckpt, folder)
    return {name: copy.deepcopy(getattr(base, name)) for name in ("unet", "text_encoder", "text_encoder_2")}


def fresh_diffusers(ckpt, folder, parts=("unet", "text_encoder", "text_encoder_2")) -> SimpleNamespace:
    """Copies of diffusers' networks ``parts`` of the toy file, no adapter on them (the ones adapters are made on)."""
    clean = _clean_parts(ckpt, folder)
    return SimpleNamespace(**{name: copy.deepcopy(clean[name]) for name in parts})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(toy SDXL file, config, folder, {layout: LoRA file}) — every file holding the same adapters."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    folder = tmp_path_factory.mktemp("sdxl-lora")
    ckpt, config = write_xl_file(folder, seed=2)
    layers = peft_layers(fresh_diffusers(ckpt, folder), ALPHA)
    metadata = {f"{part}_lora_adapter_metadata": {"r": RANK, "lora_alpha": ALPHA, "target_modules": targets}
                for part, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS),
                                      ("text_encoder_2", TEXT_TARGETS))}
    StableDiffusionXLPipeline.save_lora_weights(str(folder), weight_name="peft.safetensors", **layers, **metadata)
    made = {"peft": folder / "peft.safetensors"}
    state = load_file(str(made["peft"]))
    assert any(k.startswith("text_encoder_2.") for k in state)
    kohya = {k: v * (ALPHA / RANK) if k.endswith("lora_up.weight") else v  # its .alpha = rank: fold alpha/r in
             for k, v in convert_state_dict_to_kohya(state).items()}
    unet = shared_file_pipeline(ckpt, config).model.diffusion_model  # read only: the loaded file every test draws from
    to_sgm = {diffusers_unet_path(m, num_res_blocks(unet)).replace(".", "_"): m.replace(".", "_")
              for m in adaptable_modules(unet, "unet")}
    scaled = {k: v * (ALPHA / RANK) if ".lora_B." in k else v for k, v in state.items()}  # no metadata: scale 1
    for name, tensors in {
        "kohya": kohya,
        "kohya_sgm": renamed(kohya, lambda k: re.sub(r"^lora_unet_([^.]+)", lambda m: "lora_unet_" + to_sgm[m[1]], k)),
        "peft_no_metadata": scaled,
        "training_script": renamed(scaled, training_script_key),
        "attention_processor": renamed(scaled, processor_key),
        "peft_attention": {k: v for k, v in scaled.items() if processor_key(k)},
    }.items():
        made[name] = folder / f"{name}.safetensors"
        save_file(tensors, str(made[name]))
    assert all(k.startswith("lora_te1_") for k in load_file(str(made["kohya"])) if "lora_te" in k and "_te2_" not in k)
    return ckpt, config, folder, made


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of noisy latents (2, 4, 8, 8) and two timesteps, the U-Net's input in the comparisons."""
    return torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(1)), torch.tensor([20, 700])


def _forward(pipe) -> dict[str, torch.Tensor]:
    """Our Pipeline's conditioning of the prompts (both text towers' context, the vector y with the pooled text) and
    its U-Net's output on them."""
    x, t = _inputs()
    with torch.no_grad():
        cond = pipe.conditioning(PROMPTS, SizeConditioning.for_size(SIZE, SIZE))
        return {"context": cond["context"], "y": cond["y"],
                "out": pipe.model.diffusion_model(x, t, context=cond["context"], y=cond["y"])}  # (2, 4, 8, 8)


@functools.cache
def ours(ckpt, config, lora=None, live=False):
    """Our conditioning and U-Net output with ``lora`` applied to the loaded file (once per file and mode): folded
    into the shared Pipeline's weights and taken out again, or as live peft adapters on a copy of it."""
    if live:
        return _forward(file_pipeline(ckpt, config).with_lora(lora, live=True))
    with lora_folded(ckpt, config, lora) as pipe:
        return _forward(pipe)


@contextmanager
def diffusers_with(ckpt, folder, lora):
    """diffusers' shared pipeline of the toy file with ``lora`` loaded by its load_lora_weights (deleted after)."""
    pipe = _diffusers_base(ckpt, folder)
    pipe.load_lora_weights(str(lora), adapter_name=ADAPTER)
    try:
        yield pipe
    finally:
        pipe.delete_adapters(ADAPTER)


def _their_forward(pipe) -> dict[str, torch.Tensor]:
    """diffusers' prompt embeddings (both text encoders), pooled embedding and U-Net output for ``_forward``'s inputs
    (its size embedding of the same sizes)."""
    x, t = _inputs()
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        time_ids = pipe._get_add_time_ids((SIZE, SIZE), (0, 0), (SIZE, SIZE), dtype=torch.float32,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        out = pipe.unet(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(2, 1)},
                        return_dict=False)[0]
    return {"context": context, "pooled": pooled, "out": out}


@functools.cache
def theirs(ckpt, folder, lora, image=False):
    """diffusers' conditioning and U-Net output with ``lora`` loaded by its load_lora_weights (once per file); with
    ``image`` also its images, (2, 3, 16, 16) in [0, 1], drawn while the file is loaded."""
    with diffusers_with(ckpt, folder, lora) as pipe:
        got = _their_forward(pipe)
        if image:
            got["image"] = pipe(prompt=PROMPTS, height=SIZE, width=SIZE, num_inference_steps=DRAW["steps"],
                                guidance_scale=DRAW["guidance"], latents=_noise(DRAW["seed"], 2),
                                output_type="pt").images
        return got


def assert_acts(got: dict, base: dict, threshold: float = 0.05, names=("context", "out")) -> None:
    """The adapters change the text context and the U-Net output of the loaded file."""
    for name in names:
        assert (got[name] - base[name]).abs().max() > threshold, name


def assert_same(got: dict, other: dict, atol: float) -> None:
    """Our conditioning and U-Net output equal ``other``'s (ours, or diffusers' whose pooled text is y's start)."""
    torch.testing.assert_close(got["context"], other["context"], rtol=0, atol=atol)
    if "pooled" in other:
        torch.testing.assert_close(got["y"][:, :other["pooled"].shape[1]], other["pooled"], rtol=0, atol=atol)
    else:
        torch.testing.assert_close(got["y"], other["y"], rtol=0, atol=atol)
    torch.testing.assert_close(got["out"], other["out"], rtol=0, atol=atol)


@pytest.mark.parametrize("layout", ["peft", "kohya", "kohya_sgm", "peft_no_metadata", "training_script"])
def test_sdxl_lora_layouts_give_diffusers_outputs(files, layout):
    ckpt, config, folder, made = files
    got = ours(ckpt, config, made[layout])
    assert_acts(got, ours(ckpt, config))
    assert_same(got, theirs(ckpt, folder, made[layout], image=layout == IMAGE_LAYOUT), atol=TOLERANCE)


def test_attention_processor_layout_and_live_adapters(files):
    ckpt, config, _, made = files
    processor = ours(ckpt, config, made["attention_processor"])  # diffusers 0.42 no longer reads this layout
    assert_acts(processor, ours(ckpt, config), names=("out",))  # U-Net attention only
    assert_same(processor, ours(ckpt, config, made["peft_attention"]), atol=1e-6)
    live = ours(ckpt, config, made["kohya"], live=True)
    assert_same(live, ours(ckpt, config, made["peft"]), atol=TOLERANCE)


def test_families_are_refused_by_name(files, tmp_path):
    ckpt, config, _, made = files
    sd1 = _sd1()  # read only
    with pytest.raises(LoraFileError, match="no module of this SD 1.x / 2.x model has.*looks like kohya for SDXL"):
        read_lora_file(made["kohya"], sd1.model.diffusion_model, text_towers(sd1.cond_stage_model))
    xl = shared_file_pipeline(ckpt, config)  # read only
    unet, towers = xl.model.diffusion_model, text_towers(xl.cond_stage_model)
    sd_file = tmp_path / "sd1.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}, str(sd_file))
    with pytest.raises(LoraFileError, match="SDXL model has.*looks like kohya for SD 1.x / 2.x"):
        read_lora_file(sd_file, unet, towers)
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.hada_w1_a": torch.zeros(4, 4)}, str(loha))
    with pytest.raises(LoraFileError, match="looks like LyCORIS LoHa"):
        read_lora_file(loha, unet, towers)


def test_kohya_te1_on_a_one_encoder_model_is_its_encoder(tmp_path):
    """diffusers' convert_state_dict_to_kohya names SD 1.x's text encoder lora_te1_: the same as lora_te_."""
    system = _sd1()  # read only
    unet, text = system.model.diffusion_model, text_towers(system.cond_stage_model)
    g = torch.Generator().manual_seed(1)
    names = ["text_model_encoder_layers_1_self_attn_v_proj", "text_model_encoder_layers_0_mlp_fc1"]
    shapes = {names[0]: (32, 32), names[1]: (128, 32)}
    te = {}
    for name in names:
        out_f, in_f = shapes[name]
        te.update({f"{name}.lora_down.weight": torch.randn(2, in_f, generator=g),
                   f"{name}.lora_up.weight": torch.randn(out_f, 2, generator=g), f"{name}.alpha": torch.tensor(1.0)})
    for prefix in ("lora_te_", "lora_te1_"):
        save_file({prefix + k: v for k, v in te.items()}, str(tmp_path / f"{prefix}.safetensors"))
    one, two = (read_lora_file(tmp_path / f"{p}.safetensors", unet, text) for p in ("lora_te_", "lora_te1_"))
    assert [(w.component, w.module) for w in one] == [(w.component, w.module) for w in two]
    assert {w.module for w in one} == {"transformer.resblocks.1.attn.v_proj", "transformer.resblocks.0.mlp.c_fc"}
    assert all(torch.equal(a.up, b.up) and a.alpha == b.alpha == 1.0 for a, b in zip(one, two))


def test_txt2img_lora_on_sdxl_draws_diffusers_image(files, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from tests.scripts import load_script

    ckpt, config, folder, made = files
    txt2img = load_script("txt2img")
    argv = ["--ckpt", ckpt, "--config", config, "--lora", made[IMAGE_LAYOUT], "--prompt", PROMPTS[0], "--steps", "3",
            "--sampler", "euler", "--scale", "5", "--seed", "3", "--out", tmp_path]
    assert txt2img.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    (png,) = tmp_path.glob("*.png")
    drawn = np.asarray(Image.open(png)).astype(int)  # (16, 16, 3)
    image = theirs(ckpt, folder, made[IMAGE_LAYOUT], image=True)["image"][0]  # (3, 16, 16) in [0, 1]
    expected = (image.permute(1, 2, 0).numpy() * 255).round().astype(int)
    assert np.abs(drawn - expected).max() <= 1


CONV_TARGETS = ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]


@functools.cache
def locon_peft_file(ckpt, folder):
    """A LoCon file made with peft on diffusers' U-Net of the toy file (attention and convolution adapters), saved by
    diffusers' save_lora_weights — made once, for both layouts."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    unet = fresh_diffusers(ckpt, folder, parts=("unet",)).unet
    torch.manual_seed(1)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False,
                                       target_modules=UNET_TARGETS + CONV_TARGETS), unet)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.mul_(0.2)
    layers = get_peft_model_state_dict(unet)
    assert any(v.ndim == 4 and v.shape[-1] == 3 for v in layers.values())  # 3×3 conv adapters
    StableDiffusionXLPipeline.save_lora_weights(str(folder), weight_name="locon-peft.safetensors",
                                                unet_lora_layers=layers)
    return folder / "locon-peft.safetensors"


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_locon_conv_layers_give_diffusers_outputs(files, layout):
    """kohya's LoCon: the res-blocks' 3×3 convolutions (down (r, in, 3, 3), up (out, r, 1, 1)), their time
    projections and the samplers' convolutions, beside the attention."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    ckpt, config, folder, _ = files
    path = locon_peft_file(ckpt, folder)
    if layout == "kohya":
        kohya = convert_state_dict_to_kohya(load_file(str(path)))
        assert any("resnets_0_conv1.lora_down" in k for k in kohya)
        path = folder / "locon-kohya.safetensors"
        save_file(kohya, str(path))
    got = ours(ckpt, config, path)
    assert_acts(got, ours(ckpt, config), names=("out",))  # a U-Net LoRA
    assert_same(got, theirs(ckpt, folder, path), atol=TOLERANCE)
    assert_same(ours(ckpt, config, path, live=True), got, atol=TOLERANCE)  # peft conv adapters


def test_conv_layer_names_match_diffusers_own_converter():
    from diffusers.loaders import single_file_utils

    from ldm.bench.mapping import diffusers_unet_config
    from ldm.inference.lora_files import conv_lora_modules
    from ldm.io.checkpoints import UNET_PREFIX
    from tests.sd_toy import tiny_config
    from tests.sdxl_toy import tiny_xl_system

    for system, config in ((_sd1(), tiny_config("v1-inference")),
                           (tiny_xl_system(), tiny_xl_config())):
        unet = system.model.diffusion_model
        state = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
        params = config["model"]["params"]["unet"]["params"]
        converted = single_file_utils.convert_ldm_unet_checkpoint(state, diffusers_unet_config(params))
        where = {v.data_ptr(): k for k, v in converted.items()}
        modules = conv_lora_modules(unet)
        assert any(m.endswith(".op") for m in modules) and any(m.endswith("skip_connection") for m in modules)
        for module in modules:
            theirs = where[unet.get_submodule(module).weight.data_ptr()]
            assert theirs == diffusers_unet_path(module, num_res_blocks(unet)) + ".weight", module


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_an_sdxl_lora_written_here_loads_in_diffusers(files, layout):
    """A file read here and written back (kohya's lora_te1_ / lora_te2_, or diffusers' text_encoder_2.) gives the
    diffusers images of the file it came from."""
    from ldm.inference.lora_files import write_lora_file

    ckpt, config, folder, made = files
    xl = shared_file_pipeline(ckpt, config)  # read only
    unet = xl.model.diffusion_model
    weights = read_lora_file(made["peft"], unet, text_towers(xl.cond_stage_model))
    assert {w.component for w in weights} == {"unet", "text", "text2"}
    out = write_lora_file(weights, folder / f"written-{layout}.safetensors", layout, num_res_blocks(unet),
                          text_encoders=2)
    keys = list(load_file(str(out)))
    if layout == "kohya":
        assert {k.split("_text_model")[0] for k in keys if k.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    written, source = theirs(ckpt, folder, out), theirs(ckpt, folder, made["peft"])
    for name in ("context", "pooled", "out"):
        torch.testing.assert_close(written[name], source[name], rtol=0, atol=TOLERANCE)
