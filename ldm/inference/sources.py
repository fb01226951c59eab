"""Where a front end's model comes from: a run (``--run``, default runs/ldm/latest) or a public file with its config
(``--ckpt``, ``--config``, ``--controlnet``), described cheaply before loading and then loaded as a Pipeline.

``describe_source`` reads configs only and returns the model's name and its ``ModelCapabilities`` as far as the
config tells, so a command line or a web page refuses a bad request before anything heavy is built;
``load_source`` loads it (EMA weights unless told otherwise), applies LoRA files and a classifier.
``add_source_arguments`` / ``source_from_args`` are the command-line flags every front end shares (txt2img.py, a
web server): ``--run`` or ``--ckpt`` + ``--config`` + ``--controlnet``, ``--lora``, ``--unsafe-load``, ``--no-ema``,
``--device``, ``--dtype``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.core.errors import UserError
from ldm.inference.capabilities import ModelCapabilities
from ldm.inference.loaders import DEFAULT_RUN, describe_run, is_subclass
from ldm.inference.lora_files import lora_spec
from ldm.inference.pipeline import Pipeline
from ldm.inference.sd import describe_sd, guess_sd_config
from ldm.inference.source_checks import check_carried_config
from ldm.systems.controlnet import ControlLDM


class SourceError(UserError, ValueError):
    """Model arguments that do not go together."""


@dataclass(frozen=True)
class ModelSource:
    """A run, or a public checkpoint with its inference config (and a ControlNet file); how to load it."""

    run: str | None = None  # a stage-2 or ControlNet run directory or a .ckpt in one (None with ckpt None: the default)
    ckpt: str | None = None  # a public SD file
    config: str | None = None  # its inference config (None: guessed for SD 1.x, or carried by the file)
    controlnet: str | None = None  # a ControlNet file to load with ckpt
    unsafe: bool = False  # allow pickles that run code (--unsafe-load)
    use_ema: bool = True
    loras: tuple[tuple[str, float], ...] = ()  # LoRA files and scales
    lora_mode: str = "fold"  # fold into the weights, or "live" peft adapters
    classifier: str | None = None  # a noise-aware classifier run for classifier guidance


@dataclass(frozen=True)
class DescribedSource:
    """A source checked from its configs: a name for messages, its capabilities, the config a checkpoint loads with."""

    name: str
    capabilities: ModelCapabilities
    config: Path | None = None  # --ckpt: the inference config (None: the file carries it)
    checkpoint: Path | None = None  # --run: the checkpoint inside it


def describe_source(source: ModelSource) -> DescribedSource:
    """The run or checkpoint + config to load, checked cheaply (configs only); SourceError on bad combinations."""
    if source.ckpt is None:
        for flag, value in (("--config", source.config), ("--controlnet", source.controlnet)):
            if value is not None:
                raise SourceError(f"{flag} goes with --ckpt (a run names its own config and ControlNet)")
        run = describe_run(source.run or DEFAULT_RUN)
        caps = ModelCapabilities.of_run(run)
        return DescribedSource(str(run.run_dir), _with_classifier(caps, source), checkpoint=run.checkpoint)
    if source.run is not None:
        raise SourceError("give --run or --ckpt, not both")
    config = Path(source.config) if source.config else guess_sd_config(source.ckpt, source.unsafe)
    if config is not None and not config.is_file():
        raise SourceError(f"--config {config} not found (the SD inference configs are in configs/sd/)")
    check_carried_config(source.ckpt, config)  # a file's own config wins over another --config: refused
    sd = describe_sd(config, source.ckpt, source.controlnet)
    control = True if source.controlnet or is_subclass(sd.config.get("target", ""), ControlLDM) else None
    caps = ModelCapabilities.of_config(sd.condition_key, sd.downsampling_factor, control, sd.config)
    return DescribedSource(str(sd.checkpoint), _with_classifier(caps, source), config=config)


def _with_classifier(caps: ModelCapabilities, source: ModelSource) -> ModelCapabilities:
    return caps.with_classifier() if source.classifier else caps


def load_source(source: ModelSource, described: DescribedSource, device: str | torch.device | None = None,
                dtype: str | torch.dtype | None = None) -> Pipeline:
    """The Pipeline of a described source, with its LoRA files and classifier applied."""
    if described.checkpoint is not None:
        pipe = Pipeline.from_run(described.checkpoint, device=device, dtype=dtype, use_ema=source.use_ema)
    else:
        pipe = Pipeline.from_checkpoint(source.ckpt, described.config, controlnet=source.controlnet,
                                        unsafe=source.unsafe, device=device, dtype=dtype, use_ema=source.use_ema)
    for path, scale in source.loras:
        pipe.with_lora(path, scale, live=source.lora_mode == "live", unsafe=source.unsafe)
    if source.classifier:
        pipe.with_classifier(source.classifier)
    return pipe


def add_source_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The model flags, in a "model" group (returned, for a front end's own additions)."""
    group = parser.add_argument_group("model")
    add = group.add_argument
    add("--run", help=f"a stage-2 or ControlNet run directory, or a .ckpt in one (default {DEFAULT_RUN})")
    add("--ckpt", help="a Stable Diffusion checkpoint (.safetensors, .ckpt, .pth) instead of a run")
    add("--config", help="the inference config of --ckpt, e.g. configs/sd/v1-inference.yaml "
        "(default: guessed for SD 1.x and its inpainting files, or the config an exported file carries)")
    add("--controlnet", help="a ControlNet file to load with --ckpt (e.g. control_v11p_sd15_canny.pth)")
    add("--lora", action="append", default=[], metavar="FILE[:SCALE]",
        help="a LoRA file (kohya or diffusers layout) and its scale (default 1); repeatable")
    add("--lora-mode", choices=["fold", "live"], default="fold",
        help="fold the LoRA into the weights (default) or add it as a live adapter")
    add("--unsafe-load", action="store_true",
        help="allow pickled checkpoints that run code when loaded (only for files you trust)")
    add("--device", help="cpu, cuda, cuda:1, … (default: cuda if available)")
    add("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
        help="U-Net / VAE precision (default auto: bf16 on CUDA, fp32 on CPU)")
    add("--no-ema", action="store_true", help="use the raw weights instead of the EMA ones")
    return group


def check_device(name: str | None) -> None:
    """--device must name a device this machine has."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SourceError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, …)") from e
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise SourceError(f"--device {name}: no such CUDA device on this machine")


def lora_requests(specs: list[str]) -> tuple[tuple[str, float], ...]:
    """``FILE[:SCALE]`` arguments as (existing file, scale)."""
    out = []
    for spec in specs:
        path, scale = lora_spec(spec)
        if not path.is_file():
            raise SourceError(f"--lora {spec}: no such file {path} (give FILE or FILE:SCALE, e.g. style.safetensors:0.8)")
        out.append((str(path), scale))
    return tuple(out)


def source_from_args(args: argparse.Namespace, classifier: str | None = None) -> ModelSource:
    """The ModelSource the model flags name (the device checked, the LoRA files found)."""
    check_device(args.device)
    return ModelSource(args.run, args.ckpt, args.config, args.controlnet, args.unsafe_load, not args.no_ema,
                       lora_requests(args.lora), args.lora_mode, classifier)
