"""UNetModel: the cross-attention U-Net of latent diffusion, with openaimodel's argument and module names.

State-dict keys are Stable Diffusion's (``time_embed.{0,2}``, ``input_blocks.N.M``, ``middle_block.{0,1,2}``,
``output_blocks.N.M``, ``out.{0,2}``, optional ``label_emb``), so ``model.diffusion_model.*`` of an SD v1.x /
v2.x checkpoint, or of SDXL's (generative-models' ``UNetModel``: a transformer depth per level, the ADM vector
through ``label_emb.0.{0,2}``), loads with the prefix stripped. ``forward`` also takes ControlNet residuals
(``control``), as ControlNet's ``ControlledUnetModel`` does.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from ldm.nets.unet.attention import AttentionBackend, zero_module
from ldm.nets.unet.blocks import (
    BlockFactory,
    as_batch_timesteps,
    make_block_factory,
    normalization,
    timestep_embedding,
)

SEQUENTIAL = "sequential"  # num_classes of generative-models' U-Nets that take an ADM vector y (SDXL)


class UNetModel(nn.Module):
    """U-Net ε/v/x0 predictor over latents, conditioned on time, cross-attention context and optional class.

    Arguments are openaimodel's (see latent-diffusion): ``attention_resolutions`` lists downsampling rates
    (1, 2, 4, …) that get attention; ``num_heads`` *or* ``num_head_channels`` (-1 = unused) sets the heads;
    ``use_spatial_transformer`` + ``context_dim`` make it a cross-attention U-Net, ``use_linear_in_transformer``
    picks SD 2.x's Linear projections; ``num_classes`` adds ``label_emb``: an embedding of class labels, or with
    ``"sequential"`` (SDXL) a Linear-SiLU-Linear of the ADM vector ``y`` (``adm_in_channels`` wide) added to the
    time embedding. ``transformer_depth``: one depth or one per level (SDXL: [0, 2, 10]); the middle block takes
    ``transformer_depth_middle`` (default: the last level's). ``attention`` picks the attention backend
    (auto | sdpa | xformers | math). ``image_size`` is informational (the net is fully convolutional).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int | Sequence[int],
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | str | None = None,
        use_checkpoint: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int | Sequence[int] = 1,
        context_dim: int | None = None,
        use_linear_in_transformer: bool = False,
        legacy: bool = True,
        attention: AttentionBackend = "auto",
        transformer_depth_middle: int | None = None,
        adm_in_channels: int | None = None,
    ):
        self_config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.config: dict = self_config  # constructor arguments: what a ControlNet of this U-Net is built from
        factory = block_factory(self_config)
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.context_dim = context_dim

        self.adm_in_channels = adm_in_channels
        self.time_embed, self.label_emb = make_time_embed(factory, num_classes, adm_in_channels)
        self.input_blocks, self.middle_block, skip_channels = factory.build_encoder(in_channels)
        self.output_blocks = factory.build_decoder(skip_channels)
        self.out = nn.Sequential(
            normalization(model_channels),
            nn.SiLU(),
            zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)),
        )

    @property
    def num_control_residuals(self) -> int:
        """How many ControlNet residuals ``forward(control=…)`` takes: one per input block + the middle block."""
        return len(self.input_blocks) + 1

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor | float,
        context: Tensor | None = None,
        y: Tensor | None = None,
        control: Sequence[Tensor] | None = None,
        only_mid_control: bool = False,
    ) -> Tensor:
        """x (B, in, H, W), timesteps (B,), context (B, T, D), y (B,) labels or (B, adm) → (B, out, H, W).

        ``control``: ControlNet residuals, one per input block then the middle block's (``ControlNet``'s
        output). The last is added to the middle block's output; the others to the matching skip
        connections (all of them unless ``only_mid_control``). The caller's list is not modified.
        """
        dtype = self.time_embed[0].weight.dtype
        emb = embed_time(self.time_embed, self.label_emb, timesteps, x, y, self.model_channels)  # (B, 4C)
        context = None if context is None else context.to(dtype)
        if control is not None and len(control) != self.num_control_residuals:
            raise ValueError(f"control has {len(control)} residuals, this U-Net takes {self.num_control_residuals}")

        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)  # (B, C_mid, H/2^L, W/2^L)
        if control is not None:
            h = h + control[-1]
        for block in self.output_blocks:
            skip = skips.pop()
            if control is not None and not only_mid_control:
                skip = skip + control[len(skips)]  # the residual of the input block this skip came from
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h).to(x.dtype)  # (B, out, H, W)


LabelEmbedding = Union[nn.Embedding, nn.Sequential]


def make_time_embed(factory: BlockFactory, num_classes: int | str | None,
                    adm_in_channels: int | None = None) -> tuple[nn.Sequential, LabelEmbedding | None]:
    """``time_embed`` (Linear, SiLU, Linear) and ``label_emb``: class labels' embedding, or for ``"sequential"``
    generative-models' ADM-vector MLP ``label_emb.0.{0,2}`` (adm_in_channels → time width → time width)."""
    dim = factory.time_embed_dim
    time_embed = nn.Sequential(nn.Linear(factory.model_channels, dim), nn.SiLU(), nn.Linear(dim, dim))
    if num_classes == SEQUENTIAL:
        if not adm_in_channels:
            raise ValueError('num_classes="sequential" needs adm_in_channels (the ADM vector\'s width; SDXL: 2816)')
        adm = nn.Sequential(nn.Linear(adm_in_channels, dim), nn.SiLU(), nn.Linear(dim, dim))
        return time_embed, nn.Sequential(adm)
    if isinstance(num_classes, str):
        raise ValueError(f'num_classes must be an int, "{SEQUENTIAL}" or None, got {num_classes!r}')
    if adm_in_channels is not None:
        raise ValueError(f'adm_in_channels is set but num_classes is {num_classes!r}: the ADM vector needs '
                         f'num_classes: "{SEQUENTIAL}"')
    label_emb = nn.Embedding(num_classes, dim) if num_classes is not None else None
    return time_embed, label_emb


def embed_time(
    time_embed: nn.Module,
    label_emb: nn.Module | None,
    timesteps: Tensor | float,
    x: Tensor,
    y: Tensor | None,
    model_channels: int,
) -> Tensor:
    """Timestep (+ class or ADM vector) embedding (B, 4·model_channels) in the weights' dtype; checks y."""
    if (y is not None) != (label_emb is not None):
        raise ValueError(
            "pass class labels `y` (or SDXL's ADM vector) if and only if the model is class-conditional "
            "(num_classes set); "
            f"got y={'set' if y is not None else 'None'}, num_classes={'set' if label_emb is not None else 'None'}"
        )
    weight = time_embed[0].weight
    t = as_batch_timesteps(timesteps, x.shape[0], x.device)
    emb = time_embed(timestep_embedding(t, model_channels).to(weight.dtype))  # (B, 4C)
    if label_emb is not None:
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"y has {y.shape[0]} labels for a batch of {x.shape[0]}")
        if isinstance(label_emb, nn.Sequential):  # the ADM vector (B, adm_in_channels)
            width = label_emb[0][0].in_features
            if y.ndim != 2 or y.shape[1] != width:
                raise ValueError(f"y must be the ADM vector (B, {width}), got shape {tuple(y.shape)}")
            y = y.to(weight.dtype)
        emb = emb + label_emb(y)
    return emb


FACTORY_PARAMS = tuple(inspect.signature(make_block_factory).parameters)  # the architecture's block settings


def block_factory(config: Mapping[str, Any]) -> BlockFactory:
    """The block factory of a U-Net's constructor arguments (``unet_params``), for the U-Net and its ControlNet."""
    return make_block_factory(**{name: config[name] for name in FACTORY_PARAMS})


def unet_params(params: Mapping[str, Any], where: str = "UNetModel") -> dict:
    """``UNetModel``'s constructor arguments bound by name, defaults filled: the one declaration of the U-Net's
    architecture, which a ControlNet reuses. Unknown or missing names: a ValueError naming them."""
    try:
        bound = inspect.signature(UNetModel).bind(**params)
    except TypeError as e:
        raise ValueError(f"{where}: {e} (it takes UNetModel's parameters)") from e
    bound.apply_defaults()
    return dict(bound.arguments)
