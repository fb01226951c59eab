"""LoRA files onto a model, and a LoRA run's adapters as a file.

``read_lora_file`` reads a file in any common layout (kohya's with LoCon convolutions, peft's, diffusers' older ones:
``ldm.io.lora_layout``), made here or by other tools, as the ``LoraWeight``s of this U-Net (and CLIP text towers),
refusing a file for another model family, keys no module has and shapes that do not fit, in one line naming them. ``fold_lora`` adds scale·(alpha/r)·up·down to the weights (nothing left to run at sampling
time); ``add_live_lora`` makes the file a named peft adapter (scaled, switchable, several at once). ``trained_lora``
turns a LoRA run's checkpoint into ``LoraWeight``s; ``write_lora_file`` writes them in either layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from ldm.io.checkpoints import (
    OPENCLIP_TEXT_PREFIX,
    UNET_PREFIX,
    load_file,
    read_metadata,
    save_file_atomic,
    state_dict_of,
)
from ldm.io.lora_layout import (
    CONTEXT_FAMILIES,
    ONE_ENCODER,
    Layout,
    LoraFileError,
    LoraWeight,
    layout_tensors,
    name_table,
    parse_lora,
)
from ldm.nets.lora import (
    ADAPTER,
    LoRA,
    activate_all,
    adaptable_modules,
    add_adapter,
    conv_modules,
    is_clip_tower,
    lora_update,
    own_layer,
    set_adapter_scale,
)

PREFIXES = {"unet": UNET_PREFIX, "text": OPENCLIP_TEXT_PREFIX}  # where a system's components sit in its state dict
REPORT_MODULES = 3


def lora_spec(spec: str) -> tuple[Path, float]:
    """A ``FILE[:SCALE]`` argument as (file, scale); scale 1 when none is given (a ':' in the name is kept)."""
    path, _, scale = spec.rpartition(":")
    try:
        return (Path(path), float(scale)) if path else (Path(spec), 1.0)
    except ValueError:
        return Path(spec), 1.0


def num_res_blocks(unet: nn.Module) -> int:
    """Res-blocks per level of a U-Net (the block numbering LoRA layouts need); one count for every level."""
    count = (getattr(unet, "config", None) or {}).get("num_res_blocks")
    counts = set(count) if isinstance(count, (list, tuple)) else {count}
    if len(counts) != 1 or None in counts:
        raise LoraFileError(f"LoRA files name U-Net blocks by a fixed number of res-blocks per level; this U-Net has "
                            f"{count}")
    return int(counts.pop())


def lora_modules(unet: nn.Module, text_model: nn.Module | None, text_model_2: nn.Module | None = None
                 ) -> dict[str, list[str]]:
    """The modules a LoRA file may adapt, per component: the U-Net's transformer layers and LoCon's convolutions, and
    each text tower's blocks when it is a CLIP tower."""
    modules = {"unet": adaptable_modules(unet, "unet") + conv_modules(unet)}
    for component, tower in (("text", text_model), ("text2", text_model_2)):
        if is_clip_tower(tower):
            modules[component] = adaptable_modules(tower, "text")
    return modules


def model_family(unet: nn.Module, text_model_2: nn.Module | None = None) -> str | None:
    """SDXL with a second text encoder, else SD 1.x or 2.x by the cross-attention width (of another width: either)."""
    if text_model_2 is not None:
        return "SDXL"
    return CONTEXT_FAMILIES.get((getattr(unet, "config", None) or {}).get("context_dim"), ONE_ENCODER)


def _networks(unet: nn.Module, text_model: nn.Module | None, text_model_2: nn.Module | None = None
              ) -> dict[str, nn.Module | None]:
    return {"unet": unet, "text": text_model, "text2": text_model_2}


def check_shapes(weights: list[LoraWeight], unet: nn.Module, text_model: nn.Module | None, source: str,
                 text_model_2: nn.Module | None = None) -> None:
    """Each down (r, in[, k, k]) and up (out, r[, 1, 1]) must fit its module's (out, in[, k, k]) weight."""
    networks, bad = _networks(unet, text_model, text_model_2), []
    for w in weights:
        weight = own_layer(networks[w.component].get_submodule(w.module)).weight
        out_features, in_features = weight.flatten(1).shape
        down, up = w.down.flatten(1).shape, w.up.flatten(1).shape
        kernel_fits = w.down.shape[2:] in (weight.shape[2:], ()) and w.up.shape[2:] in ((1,) * (weight.ndim - 2), ())
        if down != (w.rank, in_features) or up != (out_features, w.rank) or not kernel_fits:
            bad.append(f"{w.module}: file down {tuple(w.down.shape)} / up {tuple(w.up.shape)} vs weight "
                       f"({out_features}, {in_features})")
    if bad:
        more = f", … ({len(bad)} in all)" if len(bad) > REPORT_MODULES else ""
        raise LoraFileError(f"{source}: LoRA shapes do not fit this model — {'; '.join(bad[:REPORT_MODULES])}{more} "
                            "(a LoRA for another base, e.g. SD 2.x on SD 1.x?)")


def read_lora_file(path: str | os.PathLike, unet: nn.Module, text_model: nn.Module | None = None,
                   unsafe: bool = False, text_model_2: nn.Module | None = None) -> list[LoraWeight]:
    """A LoRA file's adapters for this U-Net and text towers, checked family, key by key and shape by shape."""
    path = Path(path)
    state = state_dict_of(load_file(path, unsafe))
    table = name_table(lora_modules(unet, text_model, text_model_2), num_res_blocks(unet))
    weights = parse_lora(state, table, read_metadata(path), str(path), model_family(unet, text_model_2))
    check_shapes(weights, unet, text_model, str(path), text_model_2)
    return weights


@torch.no_grad()
def fold_lora(weights: list[LoraWeight], unet: nn.Module, text_model: nn.Module | None, scale: float = 1.0,
              text_model_2: nn.Module | None = None) -> None:
    """Add scale·(alpha/r)·up·down to each adapted module's weight, in its dtype (fp32 arithmetic)."""
    networks = _networks(unet, text_model, text_model_2)
    for w in weights:
        weight = own_layer(networks[w.component].get_submodule(w.module)).weight
        update = lora_update(w.down, w.up, scale * w.scale).reshape(weight.shape)
        weight.copy_((weight.float() + update.to(weight.device)).to(weight.dtype))


@torch.no_grad()
def add_live_lora(weights: list[LoraWeight], unet: nn.Module, text_model: nn.Module | None, adapter: str,
                  scale: float = 1.0, text_model_2: nn.Module | None = None) -> None:
    """Make ``weights`` a peft adapter named ``adapter`` (its update scaled by ``scale``), active with the others."""
    for component, network in _networks(unet, text_model, text_model_2).items():
        mine = [w for w in weights if w.component == component]
        if not mine:
            continue
        add_adapter(network, [w.module for w in mine], mine[0].rank, mine[0].alpha, adapter=adapter,
                    ranks={w.module: w.rank for w in mine}, alphas={w.module: w.alpha for w in mine}, init=False)
        for w in mine:
            layer = network.get_submodule(w.module)
            for part, tensor in ((layer.lora_A[adapter].weight, w.down), (layer.lora_B[adapter].weight, w.up)):
                part.copy_(tensor.reshape(part.shape))
        set_adapter_scale(network, adapter, scale)
        activate_all(network)
        network.requires_grad_(False)


def trained_lora(state: Mapping[str, Tensor], settings: LoRA, adapter: str = ADAPTER) -> list[LoraWeight]:
    """A LoRA system's adapters (its state dict or checkpoint: ``…<module>.lora_A.<adapter>.weight``) as LoraWeights."""
    weights = []
    for component, prefix in PREFIXES.items():
        suffix = f".lora_A.{adapter}.weight"
        for key in sorted(k for k in state if k.startswith(prefix) and k.endswith(suffix)):
            module = key[len(prefix):-len(suffix)]
            up = state[f"{prefix}{module}.lora_B.{adapter}.weight"]
            weights.append(LoraWeight(component, module, state[key].float(), up.float(), settings.scale * settings.rank))
    if not weights:
        raise LoraFileError(f"no LoRA adapter weights (…lora_A.{adapter}.weight) in the checkpoint")
    return weights


def write_lora_file(weights: list[LoraWeight], out: str | os.PathLike, layout: Layout, res_blocks: int,
                    metadata: Mapping[str, str] | None = None, half: bool = False) -> Path:
    """Write ``weights`` as a `.safetensors` LoRA file in ``layout`` (kohya or diffusers), atomically; fp16 with
    ``half`` (alphas stay fp32)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise LoraFileError(f"--out {out}: a LoRA file is a .safetensors file")
    tensors, layout_metadata = layout_tensors(weights, layout, res_blocks)
    if half:
        tensors = {k: v if k.endswith(".alpha") else v.half() for k, v in tensors.items()}
    return save_file_atomic(tensors, out, {**layout_metadata, **(metadata or {})})
