"""Module names in shared LoRA files: this project's (latent-diffusion / sgm) names → the names each file layout uses.

The U-Net here keeps latent-diffusion's names (``input_blocks.1.1.transformer_blocks.0.attn1.to_q``), the CLIP text
towers open_clip's (``transformer.resblocks.0.attn.q_proj``). LoRA files name modules otherwise:

- diffusers' U-Net (``down_blocks.0.attentions.0.…``, ``down_blocks.0.resnets.0.conv1``) in kohya's SD 1.x / 2.x files
  (``lora_unet_`` + the path with ``_``) and in every diffusers / peft layout;
- sgm's U-Net, i.e. ours, in kohya's SDXL files (``lora_unet_input_blocks_4_1_…``);
- Hugging Face's ``CLIPTextModel`` for text encoders in every layout (``text_model.encoder.layers.0.self_attn.q_proj``;
  transformers 5 drops the ``text_model.`` level), and diffusers' attention processors' ``to_q`` … ``to_out`` for
  their attention in the oldest layout.

``spellings`` lists every name a file may give one of our modules (before the down / up / alpha suffix).
"""

from __future__ import annotations

import re

from ldm.core.errors import UserError

HF_TEXT_ROOT = "text_model."  # transformers < 5 nests CLIPTextModel's modules under it, 5 does not
HF_TEXT_NAMES = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
                 "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
RESNET_NAMES = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                "skip_connection": "conv_shortcut"}  # ResBlock (ours) → ResnetBlock2D (diffusers)
PROCESSOR_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}  # attention processors'
PROCESSOR_TEXT_NAMES = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}
KOHYA_PREFIXES = {"unet": ("lora_unet_",), "text": ("lora_te_", "lora_te1_"), "text2": ("lora_te2_",)}
DIFFUSERS_PREFIXES = {"unet": ("unet.",), "text": ("text_encoder.",), "text2": ("text_encoder_2.",)}

_INPUT = re.compile(r"^input_blocks\.(\d+)\.(\d+)\.(.+)$")
_MIDDLE = re.compile(r"^middle_block\.(\d+)\.(.+)$")
_OUTPUT = re.compile(r"^output_blocks\.(\d+)\.(\d+)\.(.+)$")
_TEXT = re.compile(r"^transformer\.resblocks\.(\d+)\.(attn\.(?:q|k|v|out)_proj|mlp\.c_fc|mlp\.c_proj)$")
MIDDLE_PARTS = {0: "resnets.0", 1: "attentions.0", 2: "resnets.1"}


class LoraNameError(UserError, ValueError):
    """A module that no LoRA layout names."""


def _resnet(rest: str, path: str) -> str:
    if rest not in RESNET_NAMES:
        raise LoraNameError(f"{path} is not a res-block layer a LoRA adapts (one of {', '.join(RESNET_NAMES)})")
    return RESNET_NAMES[rest]


def diffusers_unet_path(path: str, num_res_blocks: int) -> str:
    """latent-diffusion's name of a U-Net module → diffusers' (``input_blocks.4.1.x`` → ``down_blocks.1.attentions.1.x``,
    ``input_blocks.3.0.op`` → ``down_blocks.0.downsamplers.0.conv`` for 2 res-blocks per level)."""
    per_level = num_res_blocks + 1  # res-blocks and a down/up-sampler per level
    if match := _INPUT.match(path):
        index, part, rest = int(match[1]), int(match[2]), match[3]
        level, j = divmod(index - 1, per_level)
        if index == 0:
            raise LoraNameError(f"{path} is the U-Net's input convolution: no LoRA layout names it")
        if j == num_res_blocks:
            return f"down_blocks.{level}.downsamplers.0.conv"  # input_blocks.<n>.0.op
        if part == 0:
            return f"down_blocks.{level}.resnets.{j}.{_resnet(rest, path)}"
        return f"down_blocks.{level}.attentions.{j}.{rest}"
    if match := _MIDDLE.match(path):
        part = MIDDLE_PARTS[int(match[1])]
        rest = _resnet(match[2], path) if part.startswith("resnets") else match[2]
        return f"mid_block.{part}.{rest}"
    if match := _OUTPUT.match(path):
        level, j = divmod(int(match[1]), per_level)
        part, rest = int(match[2]), match[3]
        if part == 0:
            return f"up_blocks.{level}.resnets.{j}.{_resnet(rest, path)}"
        if rest == "conv":  # output_blocks.<n>.1.conv or .2.conv: the level's upsampler
            return f"up_blocks.{level}.upsamplers.0.conv"
        return f"up_blocks.{level}.attentions.{j}.{rest}"
    raise LoraNameError(f"{path} is not a U-Net block's layer: no LoRA layout names it")


def hf_text_path(path: str) -> str:
    """open_clip's name of a text-tower module → Hugging Face CLIPTextModel's (``transformer.resblocks.0.attn.q_proj``
    → ``text_model.encoder.layers.0.self_attn.q_proj``)."""
    match = _TEXT.match(path)
    if not match:
        raise LoraNameError(f"{path} is not a CLIP block's attention or MLP: no LoRA layout names it")
    return f"{HF_TEXT_ROOT}encoder.layers.{match[1]}.{HF_TEXT_NAMES[match[2]]}"


def _processor_name(path: str, names: dict[str, str], infix: str) -> str | None:
    """diffusers' attention-processor spelling of an attention projection (U-Net: ``….attn1.processor.to_q``, text:
    ``….self_attn.to_q``), else None."""
    for ours, theirs in names.items():
        if path.endswith("." + ours):
            return path[: -len(ours)] + infix + theirs
    return None


def spellings(component: str, module: str, num_res_blocks: int) -> list[str]:
    """Every name a LoRA file may give ``module`` of ``component`` ("unet", "text" or "text2"): kohya's, diffusers' /
    peft's (with and without the component prefix for the U-Net, with and without ``text_model.`` for a text
    encoder) and the attention processors'."""
    if component == "unet":
        paths = [diffusers_unet_path(module, num_res_blocks)]
        kohya = [paths[0], module]  # diffusers' names (SD 1.x / 2.x files), sgm's (SDXL files)
        processor = _processor_name(paths[0], PROCESSOR_NAMES, "processor.")
        paths += [processor] if processor else []
        bare = list(paths)  # diffusers' U-Net state dict without the "unet." prefix
    else:
        hf = hf_text_path(module)
        paths = [hf, hf.removeprefix(HF_TEXT_ROOT)]
        kohya = list(paths)  # sd-scripts writes text_model_…; diffusers' converter under transformers 5 does not
        paths += [p for p in (_processor_name(path, PROCESSOR_TEXT_NAMES, "") for path in kohya) if p]
        bare = []
    names = [p + path.replace(".", "_") for p in KOHYA_PREFIXES[component] for path in kohya]
    names += [p + path for p in DIFFUSERS_PREFIXES[component] for path in paths]
    return names + bare


def kohya_name(component: str, module: str, num_res_blocks: int, sdxl: bool = False) -> str:
    """kohya's name of a module: diffusers' U-Net names and ``lora_te_`` for SD 1.x / 2.x, sgm's U-Net names and
    ``lora_te1_`` / ``lora_te2_`` for SDXL (as sd-scripts writes them)."""
    if component == "unet":
        path = module if sdxl else diffusers_unet_path(module, num_res_blocks)
    else:
        path = hf_text_path(module)
    return KOHYA_PREFIXES[component][1 if sdxl and component == "text" else 0] + path.replace(".", "_")


def diffusers_name(component: str, module: str, num_res_blocks: int) -> str:
    """diffusers' / peft's name of a module (with its component prefix)."""
    path = diffusers_unet_path(module, num_res_blocks) if component == "unet" else hf_text_path(module)
    return DIFFUSERS_PREFIXES[component][0] + path
