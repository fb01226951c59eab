"""LoRA files onto a model, and a LoRA run's adapters as a file.

``read_lora_file`` reads a kohya- or diffusers-layout file (made here or by other tools, ``ldm.io.lora_layout``) as the
``LoraWeight``s of this U-Net (and CLIP text tower, or SDXL's two: ``text_towers``), refusing keys no module has and
shapes that do not fit, in one line naming the first keys and the layout / model family the file looks like.
``fold_lora`` adds scale·(alpha/r)·up·down to the weights (nothing left to run at sampling
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
    TEXT_PREFIX,
    UNET_PREFIX,
    load_file,
    read_metadata,
    save_file_atomic,
    state_dict_of,
)
from ldm.io.lora_layout import (
    RESNET_NAMES,
    TEXT_COMPONENTS,
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
    TextTowers,
    activate_all,
    adaptable_modules,
    add_adapter,
    is_clip_tower,
    lora_update,
    own_layer,
    set_adapter_scale,
    text_towers,  # noqa: F401  (re-exported: callers read a conditioning stage's towers from here too)
)
from ldm.nets.unet.blocks import Downsample, ResBlock, Upsample

PREFIXES = {"unet": UNET_PREFIX, "text": OPENCLIP_TEXT_PREFIX}  # where a system's components sit in its state dict
SDXL_TEXT_PREFIXES = {component: f"{TEXT_PREFIX}embedders.{n}.model."  # SDXL's conditioner: a tower per embedder
                      for n, component in enumerate(TEXT_COMPONENTS)}
REPORT_MODULES = 3
LAYERS = (nn.Linear, nn.Conv2d)  # what a LoRA adapts


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


def conv_lora_modules(unet: nn.Module) -> list[str]:
    """The layers LoCon (kohya's conv LoRA) adds to a U-Net's: its res-blocks' convolutions and time projections,
    and its down- and upsamplers' convolutions (already wrapped by peft when a live LoRA adapts them)."""
    names = []
    for name, module in unet.named_modules():
        if isinstance(module, ResBlock):
            names += [f"{name}.{inner}" for inner in RESNET_NAMES
                      if isinstance(own_layer(module.get_submodule(inner)), LAYERS)]
        elif isinstance(module, Downsample) and isinstance(own_layer(module.op), nn.Conv2d):
            names.append(f"{name}.op")
        elif isinstance(module, Upsample) and module.use_conv:
            names.append(f"{name}.conv")
    return names


def lora_modules(unet: nn.Module, text_model: TextTowers) -> dict[str, list[str]]:
    """The modules a LoRA file may adapt, per component (a text tower's only when it is a CLIP tower)."""
    modules = {"unet": adaptable_modules(unet, "unet") + conv_lora_modules(unet)}
    for component, network in _networks(unet, text_model).items():
        if component != "unet" and is_clip_tower(network):
            modules[component] = adaptable_modules(network, "text")
    return modules


def _networks(unet: nn.Module, text_model: TextTowers) -> dict[str, nn.Module | None]:
    towers = list(text_model) if isinstance(text_model, (list, tuple)) else [text_model]
    if len(towers) > len(TEXT_COMPONENTS):
        raise LoraFileError(f"LoRA files name at most {len(TEXT_COMPONENTS)} text encoders; this model has "
                            f"{len(towers)}")
    return {"unet": unet, **dict(zip(TEXT_COMPONENTS, towers))}


def check_shapes(weights: list[LoraWeight], unet: nn.Module, text_model: TextTowers, source: str) -> None:
    """Each down (r, in) and up (out, r) must fit its module's (out, in) weight (1×1 kernels flattened)."""
    networks, bad = _networks(unet, text_model), []
    for w in weights:
        out_features, in_features = own_layer(networks[w.component].get_submodule(w.module)).weight.flatten(1).shape
        down, up = w.down.flatten(1).shape, w.up.flatten(1).shape
        if down != (w.rank, in_features) or up != (out_features, w.rank):
            bad.append(f"{w.module}: file down {tuple(w.down.shape)} / up {tuple(w.up.shape)} vs weight "
                       f"({out_features}, {in_features})")
    if bad:
        more = f", … ({len(bad)} in all)" if len(bad) > REPORT_MODULES else ""
        raise LoraFileError(f"{source}: LoRA shapes do not fit this model — {'; '.join(bad[:REPORT_MODULES])}{more} "
                            "(a LoRA for another base, e.g. SD 2.x on SD 1.x?)")


def read_lora_file(path: str | os.PathLike, unet: nn.Module, text_model: TextTowers = None,
                   unsafe: bool = False) -> list[LoraWeight]:
    """A LoRA file's adapters for this U-Net and text tower, checked key by key and shape by shape."""
    path = Path(path)
    state = state_dict_of(load_file(path, unsafe))
    table = name_table(lora_modules(unet, text_model), num_res_blocks(unet))
    weights = parse_lora(state, table, read_metadata(path), str(path))
    check_shapes(weights, unet, text_model, str(path))
    return weights


@torch.no_grad()
def fold_lora(weights: list[LoraWeight], unet: nn.Module, text_model: TextTowers, scale: float = 1.0) -> None:
    """Add scale·(alpha/r)·up·down to each adapted module's weight, in its dtype (fp32 arithmetic)."""
    networks = _networks(unet, text_model)
    for w in weights:
        weight = own_layer(networks[w.component].get_submodule(w.module)).weight
        update = lora_update(w.down.flatten(1), w.up.flatten(1), scale * w.scale).reshape(weight.shape)
        weight.copy_((weight.float() + update.to(weight.device)).to(weight.dtype))


@torch.no_grad()
def add_live_lora(weights: list[LoraWeight], unet: nn.Module, text_model: TextTowers, adapter: str,
                  scale: float = 1.0) -> None:
    """Make ``weights`` a peft adapter named ``adapter`` (its update scaled by ``scale``), active with the others."""
    for component, network in _networks(unet, text_model).items():
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
    """A LoRA system's adapters (its state dict or checkpoint: ``…<module>.lora_A.<adapter>.weight``) as LoraWeights;
    an SDXL conditioner's towers (``cond_stage_model.embedders.N.model.``) are the text encoders in file order."""
    weights = []
    for component, prefix in [*PREFIXES.items(), *SDXL_TEXT_PREFIXES.items()]:
        suffix = f".lora_A.{adapter}.weight"
        for key in sorted(k for k in state if k.startswith(prefix) and k.endswith(suffix)):
            module = key[len(prefix):-len(suffix)]
            up = state[f"{prefix}{module}.lora_B.{adapter}.weight"]
            weights.append(LoraWeight(component, module, state[key].float(), up.float(), settings.scale * settings.rank))
    if not weights:
        raise LoraFileError(f"no LoRA adapter weights (…lora_A.{adapter}.weight) in the checkpoint")
    return weights


def write_lora_file(weights: list[LoraWeight], out: str | os.PathLike, layout: Layout, res_blocks: int,
                    metadata: Mapping[str, str] | None = None, half: bool = False, text_encoders: int = 1) -> Path:
    """Write ``weights`` as a `.safetensors` LoRA file in ``layout`` (kohya or diffusers), atomically; fp16 with
    ``half`` (alphas stay fp32); ``text_encoders=2`` for SDXL (kohya's ``lora_te1_`` / ``lora_te2_``)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise LoraFileError(f"--out {out}: a LoRA file is a .safetensors file")
    tensors, layout_metadata = layout_tensors(weights, layout, res_blocks, text_encoders)
    if half:
        tensors = {k: v if k.endswith(".alpha") else v.half() for k, v in tensors.items()}
    return save_file_atomic(tensors, out, {**layout_metadata, **(metadata or {})})
