"""The key layouts of shared LoRA files for Stable Diffusion 1.x / 2.x and SDXL, and this project's module names.

Both common layouts name modules the way diffusers does (a U-Net of ``down_blocks`` / ``mid_block`` / ``up_blocks``,
Hugging Face's ``CLIPTextModel``), whatever the base file's own layout:

- kohya's sd-scripts (what AUTOMATIC1111, ComfyUI and most shared files use): ``lora_unet_<path with _>`` and
  ``lora_te_<path with _>``, each with ``.lora_down.weight`` (r, in), ``.lora_up.weight`` (out, r) and ``.alpha``
  (the update is up·down·alpha/r);
- diffusers' (peft's names): ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` and ``text_encoder.<path>…``, scale
  1 unless the file's ``lora_adapter_metadata`` says otherwise (files written here fold alpha/r into ``lora_B``).

Read as well: kohya's ``lora_te1_`` / ``lora_te2_`` (SDXL's two text encoders; ``lora_te1_`` alone, as diffusers'
``convert_state_dict_to_kohya`` writes for SD 1.x, is a one-encoder model's encoder) and kohya's SDXL U-Net names in
generative-models' form (``lora_unet_input_blocks_4_1_…``); diffusers' ``text_encoder_2.``; diffusers' training-script
layout (``….lora.down.weight`` / ``….lora.up.weight`` on the U-Net, ``….lora_linear_layer.down.weight`` / ``up`` on
the text encoders) and its older attention-processor layout (``…attn1.processor.to_q_lora.down.weight``).

Here the U-Net keeps latent-diffusion's names (``input_blocks.1.1.transformer_blocks.0.attn1.to_q``) and the text
encoder open_clip's (``transformer.resblocks.0.attn.q_proj``). ``diffusers_unet_path`` / ``hf_text_path`` map ours to
theirs; inside a transformer the names are the same. ``LoraWeight`` is one adapted module, layout-free.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal, Mapping

import torch
from torch import Tensor

from ldm.core.errors import UserError

Layout = Literal["kohya", "diffusers"]
LAYOUTS = ("kohya", "diffusers")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text": "lora_te_", "text2": "lora_te2_"}
KOHYA_TEXT1 = "lora_te1_"  # kohya's first text encoder of SDXL; for a one-encoder model, its encoder
DIFFUSERS_PREFIXES = {"unet": "unet.", "text": "text_encoder.", "text2": "text_encoder_2."}
TEXT_COMPONENTS = ("text", "text2")  # the text encoders, in the base file's order
KOHYA_SUFFIXES = {"down": ".lora_down.weight", "up": ".lora_up.weight", "alpha": ".alpha"}
DIFFUSERS_SUFFIXES = {"down": ".lora_A.weight", "up": ".lora_B.weight", "alpha": ".alpha"}
# diffusers' training scripts before peft (LoRALinearLayer): the U-Net's and the text encoders' names
SCRIPT_SUFFIXES = {"down": ".lora.down.weight", "up": ".lora.up.weight"}
SCRIPT_TEXT_SUFFIXES = {"down": ".lora_linear_layer.down.weight", "up": ".lora_linear_layer.up.weight"}
SUFFIX_LAYOUTS = (("kohya", KOHYA_SUFFIXES), ("diffusers / peft", DIFFUSERS_SUFFIXES),
                  ("diffusers training script", SCRIPT_SUFFIXES), ("diffusers training script", SCRIPT_TEXT_SUFFIXES))
# diffusers' attention processors (LoRAAttnProcessor): "<attention>.processor.to_q_lora.down.weight"
_PROCESSOR = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
PROCESSOR_MODULES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
# … and on the text encoders (no ".processor"): "<layer>.self_attn.to_q_lora.down.weight" → "<layer>.self_attn.q_proj"
_TEXT_PROCESSOR = re.compile(r"^(.+\.self_attn)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
TEXT_PROCESSOR_MODULES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
CONTEXT_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}  # cross-attention width (attn2.to_k's in) → family
CONTEXT_WIDTHS = {family: width for width, family in CONTEXT_FAMILIES.items()}
# Other LoRA-like files, named in refusals (LyCORIS' LoHa / LoKr / full-rank diff, DoRA's magnitudes)
OTHER_MARKERS = {"LyCORIS LoHa": ".hada_w1_a", "LyCORIS LoKr": ".lokr_w1", "LyCORIS full diff": ".diff",
                 "DoRA": ".dora_scale"}
DIFFUSERS_METADATA = "lora_adapter_metadata"  # diffusers' safetensors metadata entry (a JSON of LoraConfig fields)
REPORT_KEYS = 3  # keys an error names

_INPUT = re.compile(r"^input_blocks\.(\d+)\.1\.(.+)$")
_OUTPUT = re.compile(r"^output_blocks\.(\d+)\.1\.(.+)$")
_MIDDLE = re.compile(r"^middle_block\.1\.(.+)$")
# LoCon (kohya's conv LoRA) also adapts the res-blocks, down- and upsamplers: openaimodel's names → diffusers'
_RES_INPUT = re.compile(r"^input_blocks\.(\d+)\.0\.(.+)$")
_RES_OUTPUT = re.compile(r"^output_blocks\.(\d+)\.0\.(.+)$")
_RES_MIDDLE = re.compile(r"^middle_block\.([02])\.(.+)$")
_UPSAMPLER = re.compile(r"^output_blocks\.(\d+)\.\d\.conv$")
RESNET_NAMES = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                "skip_connection": "conv_shortcut"}
_TEXT = re.compile(r"^transformer\.resblocks\.(\d+)\.(attn\.(?:q|k|v|out)_proj|mlp\.c_fc|mlp\.c_proj)$")
HF_TEXT_ROOT = "text_model."  # transformers < 5 nests CLIPTextModel's modules under it, 5 does not
HF_TEXT_NAMES = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
                 "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


class LoraFileError(UserError, ValueError):
    """A LoRA file whose keys or shapes do not fit the model it is loaded onto."""


@dataclass(frozen=True)
class LoraWeight:
    """One adapted module: ``component`` ("unet" or "text"), its name there (ours), down (r, in[, 1, 1]), up
    (out, r[, 1, 1]) and alpha (the update is up·down·alpha/r)."""

    component: str
    module: str
    down: Tensor
    up: Tensor
    alpha: float

    @property
    def rank(self) -> int:
        """The adapter's rank r."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / r."""
        return self.alpha / self.rank


def diffusers_unet_path(path: str, num_res_blocks: int) -> str:
    """latent-diffusion's name of a module inside a U-Net transformer → diffusers' (``input_blocks.4.1.x`` →
    ``down_blocks.1.attentions.1.x`` for 2 res-blocks per level)."""
    per_level = num_res_blocks + 1  # res-blocks and a down/up-sampler per level
    if match := _INPUT.match(path):
        level, j = divmod(int(match[1]) - 1, per_level)
        return f"down_blocks.{level}.attentions.{j}.{match[2]}"
    if match := _MIDDLE.match(path):
        return f"mid_block.attentions.0.{match[1]}"
    if match := _OUTPUT.match(path):
        level, j = divmod(int(match[1]), per_level)
        return f"up_blocks.{level}.attentions.{j}.{match[2]}"
    return _diffusers_conv_path(path, num_res_blocks)


def _diffusers_conv_path(path: str, num_res_blocks: int) -> str:
    """A res-block, downsampler or upsampler layer's diffusers name (``input_blocks.1.0.in_layers.2`` →
    ``down_blocks.0.resnets.0.conv1``; ``input_blocks.3.0.op`` → ``down_blocks.0.downsamplers.0.conv``)."""
    per_level = num_res_blocks + 1
    if match := _UPSAMPLER.match(path):
        return f"up_blocks.{int(match[1]) // per_level}.upsamplers.0.conv"
    if (match := _RES_INPUT.match(path)) and match[1] != "0":
        level, j = divmod(int(match[1]) - 1, per_level)
        if match[2] == "op":
            return f"down_blocks.{level}.downsamplers.0.conv"
        return f"down_blocks.{level}.resnets.{j}.{_resnet_name(path, match[2])}"
    if match := _RES_MIDDLE.match(path):
        return f"mid_block.resnets.{int(match[1]) // 2}.{_resnet_name(path, match[2])}"
    if match := _RES_OUTPUT.match(path):
        level, j = divmod(int(match[1]), per_level)
        return f"up_blocks.{level}.resnets.{j}.{_resnet_name(path, match[2])}"
    raise LoraFileError(f"{path} is neither inside a U-Net transformer nor a res-block / sampler: no LoRA layout "
                        "names it")


def _resnet_name(path: str, inner: str) -> str:
    if inner not in RESNET_NAMES:
        raise LoraFileError(f"{path}: no LoRA layout names this part of a res-block")
    return RESNET_NAMES[inner]


def hf_text_path(path: str) -> str:
    """open_clip's name of a text-tower module → Hugging Face CLIPTextModel's (``transformer.resblocks.0.attn.q_proj``
    → ``text_model.encoder.layers.0.self_attn.q_proj``)."""
    match = _TEXT.match(path)
    if not match:
        raise LoraFileError(f"{path} is not a CLIP block's attention or MLP: no LoRA layout names it")
    return f"{HF_TEXT_ROOT}encoder.layers.{match[1]}.{HF_TEXT_NAMES[match[2]]}"


def public_name(component: str, module: str, layout: Layout, num_res_blocks: int, text_encoders: int = 1) -> str:
    """The name a layout gives one of our modules (without the down / up / alpha suffix). Kohya's SDXL layout (two
    text encoders) names them ``lora_te1_`` / ``lora_te2_`` and the U-Net's modules by generative-models' blocks
    (``lora_unet_input_blocks_4_1_…``, ours), as sd-scripts' SDXL trainer writes them."""
    if layout == "kohya" and component == "unet" and text_encoders > 1:
        return KOHYA_PREFIXES["unet"] + module.replace(".", "_")
    path = diffusers_unet_path(module, num_res_blocks) if component == "unet" else hf_text_path(module)
    if layout == "kohya":
        prefix = KOHYA_TEXT1 if component == "text" and text_encoders > 1 else KOHYA_PREFIXES[component]
        return prefix + path.replace(".", "_")
    return DIFFUSERS_PREFIXES[component] + path


def name_table(modules: Mapping[str, list[str]], num_res_blocks: int) -> dict[str, tuple[str, str]]:
    """Every public name (every layout, and diffusers' bare U-Net names) → (component, our module name)."""
    table = {}
    one_text_encoder = "text2" not in modules
    for component, names in modules.items():
        for module in names:
            for layout in LAYOUTS:
                table[public_name(component, module, layout, num_res_blocks)] = (component, module)
            if component == "unet":  # diffusers' bare U-Net state dict; kohya's SDXL names (generative-models')
                table[diffusers_unet_path(module, num_res_blocks)] = (component, module)
                table[KOHYA_PREFIXES["unet"] + module.replace(".", "_")] = (component, module)
                continue
            # files made with transformers 5 (whose CLIPTextModel has no text_model level), by diffusers or its
            # convert_state_dict_to_kohya
            bare = hf_text_path(module).removeprefix(HF_TEXT_ROOT)
            table[DIFFUSERS_PREFIXES[component] + bare] = (component, module)
            kohya = [KOHYA_PREFIXES[component]] if component == "text2" or one_text_encoder else []
            if component == "text":  # kohya's first encoder (of SDXL, or the only one); lora_te_ is SD 1.x / 2.x's
                kohya.append(KOHYA_TEXT1)
                if not one_text_encoder:
                    del table[public_name(component, module, "kohya", num_res_blocks)]
            for prefix in kohya:
                for path in (hf_text_path(module), bare):
                    table[prefix + path.replace(".", "_")] = (component, module)
    return table


def _split_key(key: str) -> tuple[str, str] | None:
    """(module name, "down" | "up" | "alpha") of a LoRA file's key, in any layout read here; None for another key."""
    if match := _PROCESSOR.match(key):
        return f"{match[1]}.{PROCESSOR_MODULES[match[2]]}", match[3]
    if match := _TEXT_PROCESSOR.match(key):
        return f"{match[1]}.{TEXT_PROCESSOR_MODULES[match[2]]}", match[3]
    for _, suffixes in SUFFIX_LAYOUTS:
        for part, suffix in suffixes.items():
            if key.endswith(suffix):
                return key[: -len(suffix)], part
    return None


def looks_like(keys: list[str]) -> str:
    """The layout (and model family) a LoRA file's keys look like, for refusals."""
    family = ""
    if any(k.startswith((KOHYA_PREFIXES["text2"], DIFFUSERS_PREFIXES["text2"])) for k in keys):
        family = " for SDXL (a second text encoder)"
    elif any(re.search(r"down_blocks[._]0[._]attentions", k) for k in keys):
        family = " for SD 1.x / 2.x (attention at the U-Net's first level)"
    for name, marker in OTHER_MARKERS.items():
        if any(marker in k for k in keys):
            return name + family
    if any(_PROCESSOR.match(k) or _TEXT_PROCESSOR.match(k) for k in keys):
        return "diffusers attention processors" + family
    for name, suffixes in SUFFIX_LAYOUTS:
        if any(k.endswith(tuple(suffixes.values())) for k in keys):
            return name + family
    return "no LoRA layout" + family


def width_family(state: Mapping[str, Tensor]) -> str | None:
    """The model family a file's cross-attention width says (its ``attn2.to_k`` down weight's input: 768 SD 1.x, 1024
    SD 2.x, 2048 SDXL), or None when it adapts no such layer."""
    for key, tensor in state.items():
        split = _split_key(key)
        if split and split[1] == "down" and re.search(r"attn2[._]to_k$", split[0]) and tensor.ndim == 2:
            return CONTEXT_FAMILIES.get(int(tensor.shape[1]))
    return None


def _listing(keys: list[str]) -> str:
    more = f", … ({len(keys)} in all)" if len(keys) > REPORT_KEYS else ""
    return ", ".join(keys[:REPORT_KEYS]) + more


def parse_lora(state: Mapping[str, Tensor], table: Mapping[str, tuple[str, str]], metadata: Mapping[str, str],
               source: str) -> list[LoraWeight]:
    """A LoRA file's tensors as ``LoraWeight``s of the modules ``table`` knows; keys it does not know, a module with
    a down but no up, and alphas of diffusers' metadata are handled here (``LoraFileError`` names the first keys)."""
    parts: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        split = _split_key(key)
        if split is None or split[0] not in table:
            unknown.append(key)
            continue
        parts.setdefault(split[0], {})[split[1]] = tensor
    family = "SDXL" if any(c == "text2" for c, _ in table.values()) else "SD 1.x / 2.x"
    theirs = width_family(state)
    if theirs is not None and theirs not in family:
        raise LoraFileError(f"{source}: a LoRA for {theirs} (cross-attention {CONTEXT_WIDTHS[theirs]} wide) cannot load "
                            f"onto this {family} model: use it with a {theirs} base")
    if unknown:
        raise LoraFileError(f"{source}: {len(unknown)} key(s) that no module of this {family} model has: "
                            f"{_listing(sorted(unknown))} (the file looks like {looks_like(sorted(state))})")
    owners: dict[tuple[str, str], list[str]] = {}
    for name in parts:
        owners.setdefault(table[name], []).append(name)
    twice = sorted(n for names in owners.values() if len(names) > 1 for n in names)
    if twice:
        raise LoraFileError(f"{source}: one module named twice (two layouts in one file?): {_listing(twice)}")
    incomplete = sorted(name for name, p in parts.items() if not {"down", "up"} <= set(p))
    if incomplete:
        raise LoraFileError(f"{source}: module(s) without both a down and an up weight: {_listing(incomplete)}")
    alphas = _metadata_alphas(metadata)
    weights = []
    for name, p in sorted(parts.items()):
        component, module = table[name]
        rank = int(p["down"].shape[0])
        alpha = float(p["alpha"]) if "alpha" in p else alphas.get(component, {}).get("alpha_over_r", 1.0) * rank
        weights.append(LoraWeight(component, module, p["down"].float(), p["up"].float(), alpha))
    if not weights:
        raise LoraFileError(f"{source} holds no LoRA weights")
    return weights


def _metadata_alphas(metadata: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """Per component, alpha / r from diffusers' ``lora_adapter_metadata`` (absent: 1)."""
    raw = metadata.get(DIFFUSERS_METADATA)
    if not raw:
        return {}
    config = json.loads(raw)
    out = {}
    for component, prefix in DIFFUSERS_PREFIXES.items():
        r, alpha = config.get(f"{prefix}r"), config.get(f"{prefix}lora_alpha")
        if r and alpha:
            out[component] = {"alpha_over_r": float(alpha) / float(r)}
    return out


def layout_tensors(weights: list[LoraWeight], layout: Layout, num_res_blocks: int,
                   text_encoders: int = 1) -> tuple[dict, dict[str, str]]:
    """(tensors, safetensors metadata) of a LoRA file in ``layout``: kohya's with ``.alpha``, or diffusers' with
    alpha/r folded into ``lora_B`` (scale 1 for every reader) and its ``lora_adapter_metadata``."""
    if layout not in LAYOUTS:
        raise LoraFileError(f"unknown LoRA layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    tensors, ranks, targets = {}, {}, {}
    for w in weights:
        name = public_name(w.component, w.module, layout, num_res_blocks, text_encoders)
        if layout == "kohya":
            tensors.update({name + KOHYA_SUFFIXES["down"]: w.down, name + KOHYA_SUFFIXES["up"]: w.up,
                            name + KOHYA_SUFFIXES["alpha"]: torch.tensor(float(w.alpha))})
        else:
            tensors.update({name + DIFFUSERS_SUFFIXES["down"]: w.down, name + DIFFUSERS_SUFFIXES["up"]: w.up * w.scale})
            prefix = DIFFUSERS_PREFIXES[w.component]
            ranks.setdefault(prefix, set()).add(w.rank)  # peft matches a target as a name suffix: transformers 5's
            targets.setdefault(prefix, []).append(name[len(prefix):].removeprefix(HF_TEXT_ROOT))  # text model lacks it
    metadata = {"format": "pt"}
    if layout == "diffusers" and all(len(r) == 1 for r in ranks.values()):
        config = {}
        for prefix, (rank,) in ranks.items():
            config.update({f"{prefix}r": rank, f"{prefix}lora_alpha": rank, f"{prefix}target_modules": targets[prefix]})
        metadata[DIFFUSERS_METADATA] = json.dumps(config, sort_keys=True)
    return {k: v.detach().float().contiguous() for k, v in tensors.items()}, metadata
