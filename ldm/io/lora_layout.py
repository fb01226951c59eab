"""The key layouts of shared LoRA files for Stable Diffusion 1.x / 2.x and SDXL, read and written.

A file names each adapted module (``ldm.io.lora_names``: diffusers' or sgm's U-Net names, Hugging Face's CLIP names)
and holds its down (r, in[, k, k]) and up (out, r[, 1, 1]) weights and maybe its alpha (the update is
up·down·alpha/r; no alpha: alpha = r). The layouts, by the suffix of their keys:

- kohya's sd-scripts (AUTOMATIC1111, ComfyUI, most shared files): ``lora_unet_…`` / ``lora_te_…`` (``lora_te1_…``,
  ``lora_te2_…`` for SDXL's two encoders) with ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; LoCon's
  convolutions (res-blocks, up- and down-samplers) are named the same way;
- peft's, as diffusers writes them now: ``unet.…`` / ``text_encoder.…`` / ``text_encoder_2.…`` with ``.lora_A.weight``
  / ``.lora_B.weight``, alpha from the file's ``lora_adapter_metadata`` (absent: alpha = r);
- diffusers' training scripts before peft: ``….lora.down.weight`` / ``.lora.up.weight`` on the U-Net,
  ``….lora_linear_layer.down.weight`` / ``.up.weight`` on the text encoders;
- diffusers' attention processors (the oldest): ``….processor.to_q_lora.down.weight`` … ``to_out_lora``.

``LoraWeight`` is one adapted module, layout-free; ``parse_lora`` reads any of these, ``layout_tensors`` writes
kohya's or peft's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, Mapping

import torch
from torch import Tensor

from ldm.core.errors import UserError
from ldm.io.lora_names import DIFFUSERS_PREFIXES, HF_TEXT_ROOT, diffusers_name, kohya_name, spellings

Layout = Literal["kohya", "diffusers"]
LAYOUTS = ("kohya", "diffusers")
PARTS = {  # key suffix → part, one row per layout
    ".lora_down.weight": "down", ".lora_up.weight": "up",  # kohya
    ".lora_A.weight": "down", ".lora_B.weight": "up",  # peft
    ".lora.down.weight": "down", ".lora.up.weight": "up",  # diffusers' training scripts (U-Net)
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",  # … (text encoders)
    "_lora.down.weight": "down", "_lora.up.weight": "up",  # diffusers' attention processors
    ".alpha": "alpha",
}
KOHYA_SUFFIXES = {"down": ".lora_down.weight", "up": ".lora_up.weight", "alpha": ".alpha"}
DIFFUSERS_SUFFIXES = {"down": ".lora_A.weight", "up": ".lora_B.weight"}
DIFFUSERS_METADATA = "lora_adapter_metadata"  # diffusers' safetensors metadata entry (a JSON of LoraConfig fields)
REPORT_KEYS = 3  # keys an error names
OTHER_TYPES = {"hada_w1_a": "a LyCORIS LoHa", "lokr_w1": "a LyCORIS LoKr", "dora_scale": "a DoRA",
               "lora_magnitude_vector": "a DoRA", ".diff": "a full-weight difference"}  # key part → what it is
CONTEXT_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}  # cross-attention context width → model family
ONE_ENCODER = "SD 1.x / 2.x"  # a one-text-encoder model of another width (a toy, a model trained here)
SECOND_ENCODER = ("lora_te2_", "text_encoder_2.")

class LoraFileError(UserError, ValueError):
    """A LoRA file whose keys or shapes do not fit the model it is loaded onto."""


@dataclass(frozen=True)
class LoraWeight:
    """One adapted module: ``component`` ("unet", "text" or "text2"), its name there (ours), down (r, in[, k, k]),
    up (out, r[, 1, 1]) and alpha (the update is up·down·alpha/r)."""

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


def _split_key(key: str) -> tuple[str, str] | None:
    """(module name, "down" | "up" | "alpha") of a LoRA file's key, in any layout; None for another key."""
    for suffix, part in PARTS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def name_table(modules: Mapping[str, list[str]], num_res_blocks: int) -> dict[str, tuple[str, str]]:
    """Every name a file may give a module (``ldm.io.lora_names.spellings``) → (component, our module name)."""
    return {name: (component, module) for component, names in modules.items() for module in names
            for name in spellings(component, module, num_res_blocks)}


def what_it_is(keys: list[str]) -> str:
    """A few words on which layout and model family a file's keys look like (for refusals)."""
    kinds = [what for part, what in OTHER_TYPES.items() if any(part in k for k in keys)]
    if kinds:
        return f"{kinds[0]} file, which this loader does not read"
    layouts = [name for name, test in (
        ("kohya", lambda k: k.startswith("lora_")), ("peft / diffusers", lambda k: ".lora_A." in k),
        ("diffusers training-script", lambda k: ".lora.down." in k or "lora_linear_layer" in k),
        ("diffusers attention-processor", lambda k: "_lora.down." in k)) if any(test(k) for k in keys)]
    return f"{' + '.join(layouts) or 'an unknown'} layout"


def file_family(state: Mapping[str, Tensor]) -> str | None:
    """The model family a LoRA file was made for: SDXL when it adapts a second text encoder, else by the width of its
    cross-attention keys (``attn2.to_k``); None when the file does not say."""
    if any(k.startswith(SECOND_ENCODER) for k in state):
        return "SDXL"
    for key, tensor in state.items():
        split = _split_key(key)
        if split and split[1] == "down" and split[0].replace("_", ".").endswith("attn2.to.k") and tensor.ndim == 2:
            return CONTEXT_FAMILIES.get(int(tensor.shape[1]))
    return None


def check_family(state: Mapping[str, Tensor], model_family: str | None, source: str) -> None:
    """Refuse a file made for another model family (an SDXL LoRA on SD 1.5), naming both."""
    family = file_family(state)
    fits = family == model_family or (model_family == ONE_ENCODER and family in ("SD 1.x", "SD 2.x"))
    if family and model_family and not fits:
        raise LoraFileError(f"{source}: a LoRA for {family} ({what_it_is(list(state))}) cannot load onto this "
                            f"{model_family} model: use it with a {family} base")


def _listing(keys: list[str]) -> str:
    more = f", … ({len(keys)} in all)" if len(keys) > REPORT_KEYS else ""
    return ", ".join(keys[:REPORT_KEYS]) + more


def parse_lora(state: Mapping[str, Tensor], table: Mapping[str, tuple[str, str]], metadata: Mapping[str, str],
               source: str, model_family: str | None = None) -> list[LoraWeight]:
    """A LoRA file's tensors as ``LoraWeight``s of the modules ``table`` knows; keys it does not know, a module with
    a down but no up, and alphas of diffusers' metadata are handled here (``LoraFileError`` names the first keys)."""
    check_family(state, model_family, source)
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
                            f" (the file looks like {what_it_is(list(state))}; a LoRA for another base?)")
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
    """Per component, alpha / r from diffusers' ``lora_adapter_metadata`` (absent: 1, i.e. alpha = r)."""
    raw = metadata.get(DIFFUSERS_METADATA)
    if not raw:
        return {}
    config = json.loads(raw)
    out = {}
    for component, (prefix,) in DIFFUSERS_PREFIXES.items():
        r, alpha = config.get(f"{prefix}r"), config.get(f"{prefix}lora_alpha")
        if r and alpha:
            out[component] = {"alpha_over_r": float(alpha) / float(r)}
    return out


def layout_tensors(weights: list[LoraWeight], layout: Layout, num_res_blocks: int, sdxl: bool = False
                   ) -> tuple[dict, dict[str, str]]:
    """(tensors, safetensors metadata) of a LoRA file in ``layout``: kohya's with ``.alpha`` (sgm's U-Net names and
    ``lora_te1_`` / ``lora_te2_`` for an SDXL model, as sd-scripts writes them), or peft's with alpha/r folded into
    ``lora_B`` (scale 1 for every reader) and its ``lora_adapter_metadata``."""
    if layout not in LAYOUTS:
        raise LoraFileError(f"unknown LoRA layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    tensors, ranks, targets = {}, {}, {}
    for w in weights:
        if layout == "kohya":
            name = kohya_name(w.component, w.module, num_res_blocks, sdxl)
            tensors.update({name + KOHYA_SUFFIXES["down"]: w.down, name + KOHYA_SUFFIXES["up"]: w.up,
                            name + KOHYA_SUFFIXES["alpha"]: torch.tensor(float(w.alpha))})
        else:
            name = diffusers_name(w.component, w.module, num_res_blocks)
            tensors.update({name + DIFFUSERS_SUFFIXES["down"]: w.down, name + DIFFUSERS_SUFFIXES["up"]: w.up * w.scale})
            (prefix,) = DIFFUSERS_PREFIXES[w.component]
            ranks.setdefault(prefix, set()).add(w.rank)  # peft matches a target as a name suffix: transformers 5's
            targets.setdefault(prefix, []).append(name[len(prefix):].removeprefix(HF_TEXT_ROOT))  # text model lacks it
    metadata = {"format": "pt"}
    if layout == "diffusers" and all(len(r) == 1 for r in ranks.values()):
        config = {}
        for prefix, (rank,) in ranks.items():
            config.update({f"{prefix}r": rank, f"{prefix}lora_alpha": rank, f"{prefix}target_modules": targets[prefix]})
        metadata[DIFFUSERS_METADATA] = json.dumps(config, sort_keys=True)
    return {k: v.detach().float().contiguous() for k, v in tensors.items()}, metadata
