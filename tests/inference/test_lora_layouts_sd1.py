"""LoRA files in every common layout on SD 1.x, made in the test with peft and diffusers' own converters on diffusers' twin of a
toy SD 1.x file: each gives, through ``--lora`` / ``Pipeline.with_lora``, the output diffusers gives for the same file
(kohya's with LoCon convolutions and ``lora_te1_``, peft's with and without adapter metadata, diffusers' training-script
and attention-processor layouts); files for another family or of another LoRA type are refused naming what they are."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from ldm.inference.lora_files import num_res_blocks, read_lora_file
from ldm.inference.pipeline import Pipeline
from ldm.io.checkpoints import UNET_PREFIX
from ldm.io.lora_layout import LoraFileError, diffusers_unet_path
from ldm.inference.lora_files import conv_lora_modules
from tests.sd_toy import file_pipeline, lora_folded, shared_file_pipeline, shared_tiny_system, tiny_config

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya  # noqa: E402

from ldm.bench.mapping import diffusers_unet_config  # noqa: E402
from tests.sd_lora_twins import clean_twins, diffusers_lora_outputs, lora_sd_file  # noqa: E402

PROMPTS = ["a red circle", "a zorb on a white background"]
RANK, ALPHA = 4, 8.0  # alpha ≠ rank: a reader that drops alpha is off by 2×
TOLERANCE = 1e-5  # fp32: max |Δ| of outputs of order 1
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2",  # transformer layers
                "conv1", "conv2", "time_emb_proj", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"]  # LoCon
TEXT_TARGETS = ["q_proj", "v_proj", "out_proj", "fc1"]
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


@pytest.fixture(scope="module")
def sd(workdir, tmp_path_factory):
    """(toy SD 1.x file, its inference config — the ones test_lora_files shares —, this module's work folder)."""
    ckpt, config = lora_sd_file(workdir / "lora-sd")
    return ckpt, config, tmp_path_factory.mktemp("lora-layouts")


def twins(sd):
    """Copies of diffusers' U-Net and text encoder holding the toy file's weights, no adapter on them."""
    return tuple(copy.deepcopy(m) for m in clean_twins(sd[0], sd[1]))


def loaded(sd) -> Pipeline:
    """A copy of our Pipeline of the toy file (loaded once), no LoRA on it."""
    return file_pipeline(sd[0], sd[1])


def folded_outputs(sd, path):
    """``our_outputs`` with the file folded into the shared Pipeline's weights, which are put back after (as loaded)."""
    with lora_folded(sd[0], sd[1], path) as pipe:
        return our_outputs(pipe)


@pytest.fixture(scope="module")
def peft_lora(sd):
    """A LoRA made by peft on diffusers' twins (random A and B, rank 4, alpha 8): its peft-layout state dict."""
    unet, text = twins(sd)
    torch.manual_seed(0)
    config = dict(r=RANK, lora_alpha=ALPHA, init_lora_weights=False)
    peft.inject_adapter_in_model(peft.LoraConfig(target_modules=UNET_TARGETS, **config), unet)
    peft.inject_adapter_in_model(peft.LoraConfig(target_modules=TEXT_TARGETS, **config), text)
    state = {f"unet.{k}": v for k, v in peft.get_peft_model_state_dict(unet).items()}
    state |= {f"text_encoder.{k}": v for k, v in peft.get_peft_model_state_dict(text).items()}
    assert any("resnets.0.conv1.lora_A" in k for k in state) and any("upsamplers.0.conv" in k for k in state)
    return {k: 0.3 * v for k, v in state.items()}


def peft_metadata(state: dict) -> dict:
    """diffusers' ``lora_adapter_metadata`` of a peft state dict: rank and alpha per component."""
    config = {}
    for prefix in ("unet.", "text_encoder."):
        targets = sorted({k[len(prefix):].split(".lora_")[0] for k in state if k.startswith(prefix)})
        config |= {f"{prefix}r": RANK, f"{prefix}lora_alpha": ALPHA, f"{prefix}target_modules": targets}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(config)}


def layout(state: dict, name: str) -> tuple[dict, dict]:
    """(tensors, metadata) of the LoRA in one layout, made with diffusers' converters where diffusers has one."""
    if name == "peft":
        return state, peft_metadata(state)
    if name == "peft-no-metadata":
        return state, {}
    if name == "kohya":  # lora_unet_… (LoCon convs too) and lora_te1_…, alpha = rank as written: set ours
        kohya = convert_state_dict_to_kohya(state)
        return {k: torch.tensor(ALPHA) if k.endswith(".alpha") else v for k, v in kohya.items()}, {}
    attention = {k: v for k, v in state.items() if k.split(".lora_")[0].endswith(ATTENTION)}
    if name == "training-script":  # ….lora.down / lora_linear_layer.down (convert_state_dict_to_diffusers)
        return convert_state_dict_to_diffusers(attention), {}
    # attention processors: unet.….attn1.processor.to_q_lora.down.weight, text ….self_attn.to_q_lora.down.weight
    old = {}
    for key, tensor in attention.items():
        module, part = key.split(".lora_")
        parent, leaf = module.rsplit(".", 1) if not module.endswith("to_out.0") else (module[:-9], "to_out")
        leaf = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}.get(leaf, leaf)
        infix = ".processor." if key.startswith("unet.") else "."
        old[f"{parent}{infix}{leaf}_lora.{'down' if part.startswith('A') else 'up'}.weight"] = tensor
    return old, {}


def diffusers_outputs(sd, path):
    """(text context, U-Net output) of diffusers' twin of the toy file with the file loaded by its load_lora_weights
    (and deleted after)."""
    return diffusers_lora_outputs(sd[0], sd[1], path, PROMPTS, *inputs())


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([20, 700])


def our_outputs(pipe):
    x, t = inputs()
    with torch.no_grad():
        context = pipe.cond_stage_model(PROMPTS)
        return context, pipe.model(x, t, context=context)


@pytest.mark.parametrize("name", ["kohya", "peft", "peft-no-metadata", "training-script", "attention-processor"])
def test_every_layout_gives_the_output_diffusers_gives(sd, peft_lora, name):
    tensors, metadata = layout(peft_lora, name)
    path = sd[2] / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    theirs = diffusers_outputs(sd, path)
    base = our_outputs(shared_file_pipeline(sd[0], sd[1]))  # read only
    assert (theirs[1] - base[1]).abs().max() > 0.05 and (theirs[0] - base[0]).abs().max() > 0.05  # the LoRA acts
    for live in (False, True):
        ours = our_outputs(loaded(sd).with_lora(path, live=True)) if live else folded_outputs(sd, path)
        for a, b in zip(ours, theirs):
            assert (a - b).abs().max() <= TOLERANCE, (name, live)


def test_live_locon_files_stack_on_convolutions_peft_already_wraps(sd, peft_lora):
    """A second live file with LoCon convolutions adapts the layers the first one wrapped: 0.7 + 0.3 live is the
    file folded in at 1."""
    tensors, metadata = layout(peft_lora, "kohya")
    path = sd[2] / "stacked.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    stacked = our_outputs(loaded(sd).with_lora(path, 0.7, live=True).with_lora(path, 0.3, live=True))
    for a, b in zip(stacked, folded_outputs(sd, path)):
        assert (a - b).abs().max() <= TOLERANCE


def test_alpha_is_read_from_the_metadata_and_is_the_rank_without_it(sd, peft_lora):
    outputs = {}
    for name in ("peft", "peft-no-metadata"):
        tensors, metadata = layout(peft_lora, name)
        save_file(tensors, str(sd[2] / f"alpha-{name}.safetensors"), metadata=metadata)
        system = shared_tiny_system()  # read only: the scales read from the file
        weights = read_lora_file(sd[2] / f"alpha-{name}.safetensors", system.model.diffusion_model,
                                 system.cond_stage_model.model)
        outputs[name] = {w.scale for w in weights}
    assert outputs == {"peft": {ALPHA / RANK}, "peft-no-metadata": {1.0}}


def test_locon_module_names_match_diffusers_own_converter():
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    unet = shared_tiny_system("v1-inference").model.diffusion_model  # read only
    params = tiny_config("v1-inference")["model"]["params"]["unet"]["params"]
    state = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    converted = single_file.convert_ldm_unet_checkpoint(state, diffusers_unet_config(params))
    where = {v.data_ptr(): k for k, v in converted.items()}
    modules = conv_lora_modules(unet)
    kinds = {m.rsplit(".", 1)[-1] for m in modules}
    assert {"2", "1", "3", "skip_connection", "op", "conv"} <= kinds, kinds  # in/out layers, emb, skip, samplers
    for module in modules:
        theirs = where[unet.get_submodule(module).weight.data_ptr()]
        assert theirs == diffusers_unet_path(module, num_res_blocks(unet)) + ".weight", module


@pytest.mark.parametrize("keys, message", [
    ({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (2, 32)},
     "no module of this SD 1.x / 2.x model has: lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight "
     "(the file looks like kohya for SDXL (a second text encoder))"),
    ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": (2, 2048)},
     "a LoRA for SDXL (cross-attention 2048 wide) cannot load onto this SD 1.x / 2.x model"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": (32, 2)}, "(the file looks like LyCORIS LoHa"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (2, 32, 1, 1),
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (2, 32, 1, 1)}, "one module named twice"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": (2, 32, 5, 5),
      "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": (32, 2, 1, 1)}, "LoRA shapes do not fit"),
])
def test_a_file_for_another_family_or_of_another_type_is_refused_naming_it(tmp_path, keys, message):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    system = shared_tiny_system()  # read only
    with pytest.raises(LoraFileError) as refused:
        read_lora_file(path, system.model.diffusion_model, system.cond_stage_model.model)
    assert message in str(refused.value) and "\n" not in str(refused.value)
