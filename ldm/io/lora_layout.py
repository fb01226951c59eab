"""The key layouts of shared LoRA files for Stable Diffusion 1.x / 2.x, and this project's module names in them.

Both common layouts name modules the way diffusers does (a U-Net of ``down_blocks`` / ``mid_block`` / ``up_blocks``,
Hugging Face's ``CLIPTextModel``), whatever the base file's own layout:

- kohya's sd-scripts (what AUTOMATIC1111, ComfyUI and most shared files use): ``lora_unet_<path with _>`` and
  ``lora_te_<path with _>``, each with ``.lora_down.weight`` (r, in), ``.lora_up.weight`` (out, r) and ``.alpha``
  (the update is up·down·alpha/r);
- diffusers' (peft's names): ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` and ``text_encoder.<path>…``, scale
  1 unless the file's ``lora_adapter_metadata`` says otherwise (files written here fold alpha/r into ``lora_B``).

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
KOHYA_PREFIXES = {"unet": "lora_unet_", "text": "lora_te_"}
DIFFUSERS_PREFIXES = {"unet": "unet.", "text": "text_encoder."}
KOHYA_SUFFIXES = {"down": ".lora_down.weight", "up": ".lora_up.weight", "alpha": ".alpha"}
DIFFUSERS_SUFFIXES = {"down": ".lora_A.weight", "up": ".lora_B.weight", "alpha": ".alpha"}
DIFFUSERS_METADATA = "lora_adapter_metadata"  # diffusers' safetensors metadata entry (a JSON of LoraConfig fields)
REPORT_KEYS = 3  # keys an error names

_INPUT = re.compile(r"^input_blocks\.(\d+)\.1\.(.+)$")
_OUTPUT = re.compile(r"^output_blocks\.(\d+)\.1\.(.+)$")
_MIDDLE = re.compile(r"^middle_block\.1\.(.+)$")
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
    raise LoraFileError(f"{path} is not inside a U-Net transformer: no LoRA layout names it")


def hf_text_path(path: str) -> str:
    """open_clip's name of a text-tower module → Hugging Face CLIPTextModel's (``transformer.resblocks.0.attn.q_proj``
    → ``text_model.encoder.layers.0.self_attn.q_proj``)."""
    match = _TEXT.match(path)
    if not match:
        raise LoraFileError(f"{path} is not a CLIP block's attention or MLP: no LoRA layout names it")
    return f"{HF_TEXT_ROOT}encoder.layers.{match[1]}.{HF_TEXT_NAMES[match[2]]}"


def public_name(component: str, module: str, layout: Layout, num_res_blocks: int) -> str:
    """The name a layout gives one of our modules (without the down / up / alpha suffix)."""
    path = diffusers_unet_path(module, num_res_blocks) if component == "unet" else hf_text_path(module)
    if layout == "kohya":
        return KOHYA_PREFIXES[component] + path.replace(".", "_")
    return DIFFUSERS_PREFIXES[component] + path


def name_table(modules: Mapping[str, list[str]], num_res_blocks: int) -> dict[str, tuple[str, str]]:
    """Every public name (both layouts, and diffusers' bare U-Net names) → (component, our module name)."""
    table = {}
    for component, names in modules.items():
        for module in names:
            for layout in LAYOUTS:
                table[public_name(component, module, layout, num_res_blocks)] = (component, module)
            if component == "unet":  # diffusers' bare U-Net state dict
                table[diffusers_unet_path(module, num_res_blocks)] = (component, module)
            else:  # diffusers' files made with transformers 5, whose CLIPTextModel has no text_model level
                table[DIFFUSERS_PREFIXES[component] + hf_text_path(module).removeprefix(HF_TEXT_ROOT)] = (component, module)
    return table


def _split_key(key: str) -> tuple[str, str] | None:
    """(module name, "down" | "up" | "alpha") of a LoRA file's key, in either layout; None for another key."""
    for suffixes in (KOHYA_SUFFIXES, DIFFUSERS_SUFFIXES):
        for part, suffix in suffixes.items():
            if key.endswith(suffix):
                return key[: -len(suffix)], part
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
    if unknown:
        raise LoraFileError(f"{source}: {len(unknown)} key(s) that no module of this model has: {_listing(sorted(unknown))}"
                            " (a LoRA for another architecture, e.g. SDXL, or a LyCORIS / LoCon type this loader "
                            "does not read)")
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


def layout_tensors(weights: list[LoraWeight], layout: Layout, num_res_blocks: int) -> tuple[dict, dict[str, str]]:
    """(tensors, safetensors metadata) of a LoRA file in ``layout``: kohya's with ``.alpha``, or diffusers' with
    alpha/r folded into ``lora_B`` (scale 1 for every reader) and its ``lora_adapter_metadata``."""
    if layout not in LAYOUTS:
        raise LoraFileError(f"unknown LoRA layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    tensors, ranks, targets = {}, {}, {}
    for w in weights:
        name = public_name(w.component, w.module, layout, num_res_blocks)
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
