"""LoRA adapters (Hu et al. 2021) on the U-Net and the text encoder, through peft (the library diffusers uses).

    lora:
      target: ldm.nets.lora.LoRA
      params:
        rank: 16
        alpha: 16                                   # the update is (alpha / rank) · B·A; default alpha = rank
        dropout: 0.0
        unet_targets: [to_q, to_k, to_v, to_out.0]  # attention; + ff.net.0.proj, ff.net.2 (feed-forward), proj_in, proj_out
        text_targets: []                            # CLIP tower: attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj,
                                                    # mlp.c_fc, mlp.c_proj (SDXL: on both of its towers)
        base_dtype: null                            # null | bf16 | fp16: the frozen base weights' dtype in training

Targets are module-name suffixes inside the U-Net's transformer blocks and the open_clip text tower's residual blocks
(whose attention is ``ClipSelfAttention``: q, k, v and out as Linear layers, as Hugging Face's CLIP has them). peft
wraps each target (``to_q`` → ``to_q.base_layer`` + ``to_q.lora_A.<adapter>`` / ``lora_B.<adapter>``), so adapters are
added *after* a network's own weights are loaded. peft is imported when adapters are first made. SDXL's conditioner has
two towers (``embedders.0``, ``embedders.1``): ``text_targets`` adapt both (``text_towers``).

``base_dtype`` (as diffusers' LoRA scripts' ``weight_dtype`` + ``cast_training_params``): when training starts
(``LatentDiffusion.configure_model``) every frozen weight of the U-Net and text encoders is cast to bf16 or fp16
(``cast_frozen``), halving their memory, while the adapters — and so their gradients and AdamW state — stay fp32.
It is meant for a mixed-precision trainer (``precision: bf16-mixed``), and runs under ``32-true`` too (the U-Net casts
its inputs to its weights' dtype); null keeps the base as loaded. Loading a run to sample or export keeps the base
file's weights as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from ldm.nets.unet.attention import SpatialTransformer

ADAPTER = "default"  # the adapter a LoRA run trains
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
UNET_PROJECTIONS = ("proj_in", "proj_out")
UNET_TARGETS = UNET_ATTENTION + UNET_FEED_FORWARD + UNET_PROJECTIONS
TEXT_ATTENTION = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj")
TEXT_MLP = ("mlp.c_fc", "mlp.c_proj")
TEXT_TARGETS = TEXT_ATTENTION + TEXT_MLP
TEXT_SCOPE = "transformer.resblocks."  # a CLIP tower's residual blocks (U-Net targets: its SpatialTransformers)
Component = Literal["unet", "text"]
LORA_MARKERS = (".lora_A.", ".lora_B.")
GAUSSIAN_INIT = "gaussian"  # A ~ N(0, 1/rank), B = 0 (diffusers' train_text_to_image_lora.py): starts as the base
BASE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # base_dtype's values (besides null)
TextTowers = Union[nn.Module, Sequence[nn.Module], None]  # one CLIP tower, SDXL's two (in file order), or none


class LoRAError(ValueError):
    """A LoRA setting or module name that does not fit the networks."""


def _peft():
    """peft's LoRA entry points (imported on first use: peft pulls in transformers)."""
    try:
        import peft
        from peft.tuners.lora import LoraLayer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise LoRAError("LoRA needs peft: pip install peft (or pip install -e .)") from e
    return peft, LoraLayer


@dataclass(frozen=True)
class LoRA:
    """LoRA settings of a fine-tune: rank, alpha (None: = rank), dropout and the modules adapted."""

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    unet_targets: list[str] = field(default_factory=lambda: list(UNET_ATTENTION))
    text_targets: list[str] = field(default_factory=list)
    base_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise LoRAError(f"lora rank must be at least 1, got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise LoRAError(f"lora alpha must be positive (or null for alpha = rank), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"lora dropout must be in [0, 1), got {self.dropout}")
        for name, given, allowed in (("unet_targets", self.unet_targets, UNET_TARGETS),
                                     ("text_targets", self.text_targets, TEXT_TARGETS)):
            unknown = [t for t in given if t not in allowed]
            if unknown:
                raise LoRAError(f"lora {name}: unknown target {unknown[0]!r}; choose from {', '.join(allowed)}")
        if not self.unet_targets and not self.text_targets:
            raise LoRAError("lora: no targets (set unet_targets and/or text_targets)")
        if self.base_dtype is not None and self.base_dtype not in BASE_DTYPES:
            raise LoRAError(f"lora base_dtype: {self.base_dtype!r} is not one of null, {', '.join(BASE_DTYPES)}")

    @property
    def torch_base_dtype(self) -> torch.dtype | None:
        """``base_dtype`` as a torch dtype (None: the base stays as loaded)."""
        return BASE_DTYPES[self.base_dtype] if self.base_dtype is not None else None

    @property
    def scale(self) -> float:
        """alpha / rank, the factor of B·A."""
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def apply(self, unet: nn.Module, text_model: TextTowers) -> None:
        """Add this adapter to the U-Net (and every text tower: one, or SDXL's two) and make only adapter weights
        trainable (all in place)."""
        add_adapter(unet, target_modules(unet, self.unet_targets, "unet"), self.rank, self._alpha, self.dropout)
        if not self.text_targets:
            return
        towers = list(text_model) if isinstance(text_model, (list, tuple)) else [text_model]
        if not all(is_clip_tower(tower) for tower in towers):
            raise LoRAError("lora text_targets: the text encoder is not a CLIP text tower (FrozenOpenCLIP); "
                            "LoRA on the text encoder is for Stable Diffusion's")
        for tower in towers:
            add_adapter(tower, target_modules(tower, self.text_targets, "text"), self.rank, self._alpha, self.dropout)

    @property
    def _alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


def is_clip_tower(text_model: nn.Module | None) -> bool:
    """Whether a text encoder's ``model`` is an open_clip text tower (residual blocks a LoRA can adapt)."""
    return text_model is not None and hasattr(getattr(text_model, "transformer", None), "resblocks")


def text_towers(cond_stage: nn.Module) -> TextTowers:
    """The CLIP towers of a conditioning stage a LoRA may adapt: its ``model`` (SD), every embedder's (SDXL)."""
    if hasattr(cond_stage, "embedders"):
        return [getattr(e, "model", None) for e in cond_stage.embedders]
    return getattr(cond_stage, "model", None)


@torch.no_grad()
def cast_frozen(network: nn.Module, dtype: torch.dtype) -> int:
    """Cast every frozen (non-adapter) floating parameter of ``network`` to ``dtype`` in place, the adapters left as
    they are; returns how many were cast."""
    cast = 0
    for name, param in network.named_parameters():
        if not is_lora_key(name) and not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def adaptable_modules(network: nn.Module, component: Component) -> list[str]:
    """Every module a LoRA may adapt: in the U-Net its SpatialTransformers' attention, feed-forward and projections
    (``UNET_TARGETS``), in a CLIP tower its blocks' attention and MLP (``TEXT_TARGETS``); peft's own sub-modules aside."""
    suffixes = UNET_TARGETS if component == "unet" else TEXT_TARGETS
    scopes = (tuple(f"{n}." for n, m in network.named_modules() if isinstance(m, SpatialTransformer))
              if component == "unet" else (TEXT_SCOPE,))
    return [name for name, _ in network.named_modules()
            if scopes and name.startswith(scopes) and any(name.endswith(f".{s}") for s in suffixes)
            and ".lora_" not in name and ".base_layer" not in name]


def target_modules(network: nn.Module, suffixes: Iterable[str], component: Component) -> list[str]:
    """The adaptable modules of ``network`` whose names end with one of ``suffixes``."""
    suffixes = tuple(suffixes)
    names = [n for n in adaptable_modules(network, component) if any(n.endswith(f".{s}") for s in suffixes)]
    if suffixes and not names:
        raise LoRAError(f"no module of {type(network).__name__} matches the LoRA targets {', '.join(suffixes)}")
    return names


def add_adapter(network: nn.Module, modules: list[str], rank: int, alpha: float, dropout: float = 0.0,
                adapter: str = ADAPTER, ranks: Mapping[str, int] | None = None,
                alphas: Mapping[str, float] | None = None, init: str | bool = GAUSSIAN_INIT) -> None:
    """Wrap ``modules`` of ``network`` with a peft LoRA adapter (per-module ``ranks`` / ``alphas`` override ``rank`` /
    ``alpha``); only this adapter's weights keep ``requires_grad``."""
    if not modules:
        return
    peft, _ = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(modules),
                             rank_pattern=_patterns(ranks), alpha_pattern=_patterns(alphas), init_lora_weights=init)
    peft.inject_adapter_in_model(config, network, adapter_name=adapter)
    for name, param in network.named_parameters():
        param.requires_grad_(is_lora_key(name) and f".{adapter}." in name)


def _patterns(values: Mapping[str, float] | None) -> dict:
    """Per-module values keyed by a peft pattern (a regex) matching that module only."""
    return {re.escape(name): value for name, value in (values or {}).items()}


def is_lora_key(key: str) -> bool:
    """Whether a parameter / state-dict key is a LoRA adapter's (``…lora_A.<adapter>.weight``)."""
    return any(marker in key for marker in LORA_MARKERS)


def lora_layers(network: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers of ``network``, by module name."""
    _, layer_type = _peft()
    return {name: m for name, m in network.named_modules() if isinstance(m, layer_type)}


def set_adapter_scale(network: nn.Module, adapter: str, scale: float) -> None:
    """Scale an adapter's update by ``scale`` (× its alpha / rank) in every layer that has it."""
    for layer in lora_layers(network).values():
        layer.set_scale(adapter, scale)


def activate_all(network: nn.Module) -> None:
    """Every adapter of every LoRA layer active at once (their updates add), none of them trainable."""
    for layer in lora_layers(network).values():
        names = [n for n in layer.lora_A.keys()]
        layer.set_adapter(names, inference_mode=True)


@torch.no_grad()
def merge_adapters(network: nn.Module) -> int:
    """Fold every active adapter into its base layer's weights and put the base layers back (the module names and
    state-dict keys are the network's own again); returns how many layers were folded."""
    layers = lora_layers(network)
    for name in sorted(layers, key=lambda n: -n.count(".")):  # inner layers first (an MHA's out_proj)
        layer = network.get_submodule(name)
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(network.get_submodule(parent) if parent else network, child, layer.get_base_layer())
    return len(layers)


def own_layer(layer: nn.Module) -> nn.Module:
    """The Linear / Conv2d holding a module's own weight (peft's wrapper keeps it in ``base_layer``)."""
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


def lora_update(down: Tensor, up: Tensor, scale: float) -> Tensor:
    """scale · up @ down as a weight update: (out, r) @ (r, in) → (out, in); 1×1 convolutions keep their (…, 1, 1)."""
    update = up.flatten(1).float() @ down.flatten(1).float()  # (out, in)
    return (scale * update).reshape(up.shape[:1] + down.shape[1:])
