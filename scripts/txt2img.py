"""Text (or class) to image from a trained run or a public Stable Diffusion file: PNGs with their parameters.

    python scripts/txt2img.py --prompt "a red circle on a blue background"       # runs/ldm/latest
    python scripts/txt2img.py --run runs/ldm/<name> --prompt "…" --n 8 --steps 20 --sampler dpmpp_2m \\
           --scale 5 --negative-prompt "…" --seed 7 --out outputs/
    python scripts/txt2img.py --from-file prompts.txt --n 4
    python scripts/txt2img.py --run runs/ldm/<class-run> --class 3 --n 16        # or --class seven: a class folder
    python scripts/txt2img.py --run runs/controlnet/latest --control edges.png --prompt "…" --control-scale 1.0
    python scripts/txt2img.py --ckpt v1-5-pruned-emaonly.safetensors --config configs/sd/v1-inference.yaml \\
           --controlnet control_v11p_sd15_canny.pth --control edges.png --prompt "…" --steps 25
    python scripts/txt2img.py --ckpt sd_xl_base_1.0.safetensors --config configs/sd/xl-base-inference.yaml \\
           --W 1024 --H 1024 --prompt "…" --original-size 1024 1024 --crop-top-left 0 0   # SDXL

--lora FILE[:SCALE] (repeatable; scale 1 by default) applies a LoRA file in kohya's or diffusers' layout, made here
(scripts/export.py of a LoRA run) or by other tools, to the U-Net and text encoder of --ckpt or --run: folded into
the weights (--lora-mode fold, the default) or as live peft adapters (--lora-mode live).
A control image of any size and mode is converted to RGB and resized to the output size. Pickled
checkpoints are read without running code from them; one that needs full unpickling is refused unless
--unsafe-load is given (only for files you trust).

Image i of a call starts from seed + i; the seed and every setting are printed and stored in each PNG's
text metadata ("parameters" in AUTOMATIC1111's style, "ldm" as JSON). Bad arguments exit with code 2
and a one-line ``error: …``. Flow: parse → validate → load pipeline → generate → save.
"""

from __future__ import annotations

import argparse
import inspect
import json
import secrets
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ldm.core.errors import UserError
from ldm.core.images import from_pil, image_grid, save_image_atomic
from ldm.core.logging import setup_cli_logging
from ldm.core.threads import add_threads_argument, apply_threads
from ldm.diffusion import SAMPLERS
from ldm.diffusion.sampling import FEW_STEPS, default_sampler
from ldm.inference.loaders import is_subclass, resolve_class
from ldm.inference.lora_files import lora_spec
from ldm.inference.pipeline import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONTROL_SCALE,
    DEFAULT_GUIDANCE,
    DEFAULT_RUN,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    Generation,
    Pipeline,
    PipelineError,
    describe_run,
    guess_sd_config,
)
from ldm.inference.png_params import INDEX_DIGITS, next_index, png_info, slug
from ldm.inference.sd import describe_sd
from ldm.inference.source_checks import check_carried_config, check_latent_multiple, lineage_of
from ldm.nets.compile import CompilerUnavailableError
from ldm.nets.conditioning.sdxl import SIZE_FIELDS
from ldm.systems.controlnet import ControlLDM

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
DEFAULT_OUT = "outputs"
SEED_RANGE = 2**31  # a random seed is drawn below this when none is given
GRID_MAX_COLUMNS = 8
DEFAULT_CLASSIFIER_SCALE = 1.0  # with the exact p(y | x), scale 1 samples p(x | y)


class CLIError(UserError):
    """A bad command-line argument."""


class Parser(argparse.ArgumentParser):
    """argparse that raises CLIError (one line, no usage dump) instead of exiting."""

    def error(self, message: str):
        raise CLIError(message)


@dataclass(frozen=True)
class Source:
    """Where the model comes from (a run, or a checkpoint + config), as far as its config tells before loading."""

    name: str  # the run directory or the checkpoint, for messages
    condition_key: str  # "caption" or "label"
    n_classes: int | None
    downsampling_factor: int | None
    controlnet: bool | None  # None: only loading tells (a full ControlNet v1.0 file holds one)
    run: Path | None = None  # --run: the checkpoint inside it
    config: Path | None = None  # --ckpt: the inference config (None: the file carries it)
    class_names: list[str] | None = None  # a class run's names: --class NAME
    model: dict | None = None  # the model node (its U-Net tells the size step)


@dataclass
class Request:
    """What to draw, validated: conditions (one per image), seeds and the pipeline's options."""

    conditions: list  # prompts (text run) or class labels (class run), each repeated n times
    seeds: list[int]
    options: dict  # keyword arguments of Pipeline.generate
    source: Source


# ---------------------------------------------------------------------------------------------- parse


def build_parser() -> argparse.ArgumentParser:
    """The command line, in groups: what to draw, sampling, model, control, output."""
    p = Parser(prog="txt2img.py", description=__doc__.splitlines()[0])
    what = p.add_argument_group("what to draw")
    what.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    what.add_argument("--from-file", metavar="FILE", help="prompts, one per line (blank lines skipped)")
    what.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME|INDEX",
                      help="a class name (e.g. its folder's name) or index, for class-conditional runs (repeatable)")
    what.add_argument("--negative-prompt", help="what to steer away from (text runs)")
    what.add_argument("--n", type=int, default=1, help="images per prompt / class (default 1)")
    samp = p.add_argument_group("sampling")
    samp.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampler steps (default {DEFAULT_STEPS})")
    samp.add_argument("--sampler", choices=list(SAMPLERS),
                      help=f"default {DEFAULT_SAMPLER}, or ddim at {FEW_STEPS} steps or fewer (where it reads better)")
    samp.add_argument("--scale", type=float, default=DEFAULT_GUIDANCE,
                      help=f"classifier-free guidance scale; 1 = no guidance (default {DEFAULT_GUIDANCE})")
    samp.add_argument("--guidance-rescale", type=float, default=0.0, help="CFG rescale φ in [0, 1] (Lin et al. 2023)")
    samp.add_argument("--eta", type=float, help="noise of DDIM (0 = deterministic) or Euler-ancestral")
    samp.add_argument("--seed", type=int, help="seed of the first image; image i gets seed + i (default: random)")
    samp.add_argument("--H", type=int, help="height in pixels (default: the run's image size)")
    samp.add_argument("--W", type=int, help="width in pixels (default: the run's image size)")
    for flag, names in (("--original-size", ("H", "W")), ("--crop-top-left", ("TOP", "LEFT")),
                        ("--target-size", ("H", "W"))):
        samp.add_argument(flag, type=int, nargs=2, metavar=names,
                          help="SDXL's micro-conditioning in pixels (default: the image size; crop 0 0)")
    samp.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                      help=f"images drawn at once (default {DEFAULT_BATCH_SIZE})")
    model = p.add_argument_group("model")
    model.add_argument("--run", help=f"a stage-2 or ControlNet run directory, or a .ckpt in one (default {DEFAULT_RUN})")
    add_threads_argument(model)
    model.add_argument("--ckpt", help="a Stable Diffusion checkpoint (.safetensors, .ckpt, .pth) instead of a run")
    model.add_argument("--config", help="the inference config of --ckpt, e.g. configs/sd/v1-inference.yaml "
                       "(default: guessed for SD 1.x, or the config an exported file carries)")
    model.add_argument("--controlnet", help="a ControlNet file to load with --ckpt (e.g. control_v11p_sd15_canny.pth)")
    model.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                       help="a LoRA file (kohya or diffusers layout) and its scale (default 1); repeatable")
    model.add_argument("--lora-mode", choices=["fold", "live"], default="fold",
                       help="fold the LoRA into the weights (default) or add it as a live adapter")
    model.add_argument("--unsafe-load", action="store_true",
                       help="allow pickled checkpoints that run code when loaded (only for files you trust)")
    model.add_argument("--device", help="cpu, cuda, cuda:1, … (default: cuda if available)")
    model.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="U-Net / VAE precision (default auto: bf16 on CUDA, fp32 on CPU)")
    model.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA ones")
    model.add_argument("--compile", action="store_true",
                       help="torch.compile the U-Net (and ControlNet), weights frozen: the first batch compiles "
                            "(tens of seconds), later ones run faster; pays off for many images")
    steer = p.add_argument_group("classifier guidance (class and unconditional runs)")
    steer.add_argument("--classifier", metavar="RUN", help="a noise-aware classifier run (stages/train_classifier.py) "
                       "that steers each image toward its --class")
    steer.add_argument("--classifier-scale", type=float, help="its scale s (default 1): s·∇ log p(class | x) added")
    control = p.add_argument_group("control (ControlNet models)")
    control.add_argument("--control", metavar="IMAGE", help="the control image (e.g. an edge map); any size and "
                         "mode: it is converted to RGB and resized to the output size")
    control.add_argument("--control-scale", type=float,
                         help=f"strength of the control residuals (default {DEFAULT_CONTROL_SCALE})")
    control.add_argument("--guess-mode", action="store_true",
                         help="control in the conditional branch only, scales decaying by depth (0.825^(12 - i))")
    out = p.add_argument_group("output")
    out.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT}/)")
    out.add_argument("--no-grid", action="store_true", help="do not write the grid image")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line (CLIError on a bad one)."""
    args = build_parser().parse_args(argv)
    args.sampler = args.sampler or default_sampler(args.steps)
    return args


# ---------------------------------------------------------------------------------------------- validate


def read_prompts(path: str) -> list[str]:
    """Non-blank lines of a prompt file, stripped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read --from-file {path}: {getattr(e, 'strerror', None) or e}") from e
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise CLIError(f"--from-file {path} holds no prompts (it is empty or has only blank lines)")
    return prompts


def check_numbers(args: argparse.Namespace) -> None:
    """Ranges of the numeric options."""
    positive = {"--n": args.n, "--steps": args.steps, "--batch-size": args.batch_size}
    for name, value in positive.items():
        if value < 1:
            raise CLIError(f"{name} must be at least 1, got {value}")
    if args.scale < 0:
        raise CLIError(f"--scale must be ≥ 0, got {args.scale}")
    if not 0 <= args.guidance_rescale <= 1:
        raise CLIError(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale}")
    if args.seed is not None and args.seed < 0:
        raise CLIError(f"--seed must be ≥ 0, got {args.seed}")
    for name, value in (("--H", args.H), ("--W", args.W)):
        if value is not None and value < 1:
            raise CLIError(f"{name} must be a positive number of pixels, got {value}")
    if args.eta is not None:
        if "eta" not in inspect.signature(SAMPLERS[args.sampler]).parameters:
            takers = [name for name, fn in SAMPLERS.items() if "eta" in inspect.signature(fn).parameters]
            raise CLIError(f"--eta applies to the samplers {', '.join(takers)}, not {args.sampler}")
        if args.eta < 0:
            raise CLIError(f"--eta must be ≥ 0, got {args.eta}")


def lora_requests(specs: Sequence[str]) -> list[tuple[Path, float]]:
    """``FILE[:SCALE]`` arguments as (existing file, scale)."""
    out = []
    for spec in specs:
        path, scale = lora_spec(spec)
        if not path.is_file():
            raise CLIError(f"--lora {spec}: no such file {path} (give FILE or FILE:SCALE, e.g. style.safetensors:0.8)")
        out.append((path, scale))
    return out


def check_device(args: argparse.Namespace) -> None:
    """--device must name a device this machine has."""
    if args.device is None:
        return
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise CLIError(f"--device {args.device!r} is not a device name (cpu, cuda, cuda:1, …)") from e
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise CLIError(f"--device {args.device}: no such CUDA device on this machine")


def check_size(args: argparse.Namespace, source: Source) -> None:
    """--H / --W must be multiples of the VAE's factor (when its config tells it, before loading anything)."""
    factor = source.downsampling_factor
    for name, value in (("--H", args.H), ("--W", args.W)):
        if factor and value is not None and value % factor:
            raise CLIError(f"{name} {value} is not divisible by the VAE's downsampling factor {factor}")
    check_latent_multiple(source.model or {}, factor, args.H, args.W)  # … and of the U-Net's halvings


def conditions_for(args: argparse.Namespace, run: Source) -> list:
    """The prompts or class labels the arguments ask for, checked against the kind of model."""
    prompts = list(args.prompt) + (read_prompts(args.from_file) if args.from_file else [])
    if run.condition_key == "label":
        if prompts or args.negative_prompt is not None:
            flag = "--negative-prompt" if not prompts else "--prompt/--from-file"
            raise CLIError(f"{run.name} is a class-conditional run: use --class NAME or INDEX, not {flag}")
        if not args.classes:
            raise CLIError("give at least one --class NAME or INDEX for this class-conditional run")
        try:
            return [resolve_class(c, run.class_names, run.n_classes) for c in args.classes]
        except PipelineError as e:
            raise CLIError(f"{Path(run.name).name}: {e}") from None
    if args.classes:
        raise CLIError(f"{run.name} is a text-conditional run: use --prompt or --from-file, not --class")
    if not prompts:
        raise CLIError("give --prompt TEXT (repeatable) or --from-file FILE")
    return prompts


def describe_source(args: argparse.Namespace) -> Source:
    """The run (--run, default runs/ldm/latest) or checkpoint (--ckpt + --config) to load, checked cheaply."""
    if args.ckpt is None:
        for flag, value in (("--config", args.config), ("--controlnet", args.controlnet)):
            if value is not None:
                raise CLIError(f"{flag} goes with --ckpt (a run names its own config and ControlNet)")
        run = describe_run(args.run or DEFAULT_RUN)
        return Source(str(run.run_dir), run.condition_key, run.n_classes, run.downsampling_factor, run.controlnet,
                      run=run.checkpoint, class_names=run.class_names, model=run.config.get("model"))
    if args.run is not None:
        raise CLIError("give --run or --ckpt, not both")
    config = Path(args.config) if args.config else guess_sd_config(args.ckpt, args.unsafe_load)
    if config is not None and not config.is_file():
        raise CLIError(f"--config {config} not found (the SD inference configs are in configs/sd/)")
    check_carried_config(args.ckpt, config)  # a file's own config wins over another --config: refused
    sd = describe_sd(config, args.ckpt, args.controlnet)
    control = True if args.controlnet or is_subclass(sd.config.get("target", ""), ControlLDM) else None
    return Source(str(sd.checkpoint), sd.condition_key, None, sd.downsampling_factor, control, config=config,
                  model=sd.config)


def check_control(args: argparse.Namespace, source: Source) -> None:
    """--control goes with a ControlNet model and is a readable image; --control-scale / --guess-mode need it."""
    if args.control is None:
        for flag, given in (("--control-scale", args.control_scale is not None), ("--guess-mode", args.guess_mode)):
            if given:
                raise CLIError(f"{flag} needs --control IMAGE")
        if source.controlnet:
            raise CLIError(f"{source.name} is a ControlNet model: give --control IMAGE (e.g. an edge map)")
        return
    if source.controlnet is False:
        raise CLIError(f"--control needs a ControlNet model, and {source.name} has none: use a run under "
                       "runs/controlnet/, or --ckpt with --controlnet FILE")
    if args.control_scale is not None and not args.control_scale >= 0:
        raise CLIError(f"--control-scale must be ≥ 0, got {args.control_scale}")
    try:
        with Image.open(args.control) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise CLIError(f"cannot read --control {args.control}: {getattr(e, 'strerror', None) or e}") from e


def validate(args: argparse.Namespace) -> Request:
    """Everything that can be checked before loading the models: numbers, model kind, conditions, size, control."""
    check_numbers(args)
    check_device(args)
    args.loras = lora_requests(args.lora)
    source = describe_source(args)
    check_size(args, source)
    check_control(args, source)
    base = conditions_for(args, source)
    conditions = [c for c in base for _ in range(args.n)]  # each prompt / class n times, in order
    seed = args.seed if args.seed is not None else secrets.randbelow(SEED_RANGE)
    options = dict(steps=args.steps, guidance=args.scale, sampler=args.sampler, height=args.H, width=args.W,
                   guidance_rescale=args.guidance_rescale, batch_size=args.batch_size, negative=args.negative_prompt)
    if args.eta is not None:
        options["eta"] = args.eta
    options.update({k: v for k in SIZE_FIELDS if (v := getattr(args, k)) is not None})  # SDXL's sizes
    if args.control is not None:
        options.update(control=args.control, guess_mode=args.guess_mode,
                       control_scale=DEFAULT_CONTROL_SCALE if args.control_scale is None else args.control_scale)
    if args.classifier_scale is not None and not args.classifier:
        raise CLIError("--classifier-scale needs --classifier RUN (a classifier trained with stages/train_classifier.py)")
    if args.classifier:
        if source.condition_key != "label":
            raise CLIError("--classifier steers toward class labels: give a class (or unconditional) run and --class")
        options["classifier_scale"] = DEFAULT_CLASSIFIER_SCALE if args.classifier_scale is None else args.classifier_scale
    return Request(conditions, [seed + i for i in range(len(conditions))], options, source)


# ---------------------------------------------------------------------------------------------- load, generate


def load_pipeline(args: argparse.Namespace, request: Request) -> Pipeline:
    """The pipeline for --run, or for --ckpt with its --config (and --controlnet)."""
    source = request.source
    if source.run is not None:
        pipe = Pipeline.from_run(source.run, device=args.device, dtype=args.dtype, use_ema=not args.no_ema)
    else:
        pipe = Pipeline.from_checkpoint(args.ckpt, source.config, controlnet=args.controlnet,
                                        unsafe=args.unsafe_load, device=args.device, dtype=args.dtype,
                                        use_ema=not args.no_ema)
    for path, scale in args.loras:
        pipe.with_lora(path, scale, live=args.lora_mode == "live", unsafe=args.unsafe_load)
    if args.classifier:
        pipe.with_classifier(args.classifier)
    if args.compile:
        try:
            pipe.compile()
        except CompilerUnavailableError as e:
            raise UserError(f"--compile: {e}") from e
    return pipe


def check_prompts(pipe: Pipeline, request: Request) -> None:
    """Check the request against the loaded model; warn about truncated prompts once, before sampling."""
    pipe.check_conditions(request.conditions)
    options = request.options
    pipe.latent_shape(options["height"] or pipe.image_size, options["width"] or pipe.image_size)
    negative = [options["negative"]] if options["negative"] is not None else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.encode(list(dict.fromkeys(request.conditions)) + negative)  # the tokenizer warns once per prompt
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"warning: {message}", file=sys.stderr, flush=True)


def generate(pipe: Pipeline, request: Request) -> Iterator[Generation]:
    """Sample the request one batch at a time, with a progress bar in a terminal (a log gets the saved paths)."""
    return pipe.iter_generate(request.conditions, seed=request.seeds[0], progress=sys.stderr.isatty(),
                              **request.options)


# ---------------------------------------------------------------------------------------------- save


def image_parameters(request: Request, pipe: Pipeline, condition, seed: int) -> dict:
    """Everything needed to redraw one image."""
    o = request.options
    kind = "class" if request.source.condition_key == "label" else "prompt"
    params = {kind: condition, "negative_prompt": o["negative"], "seed": seed, "steps": o["steps"],
              "sampler": o["sampler"], "scale": o["guidance"], "guidance_rescale": o["guidance_rescale"],
              "height": o["height"] or pipe.image_size, "width": o["width"] or pipe.image_size,
              "run": pipe.source.get("run"), "checkpoint": pipe.source.get("checkpoint"),
              "ema": pipe.source.get("ema"), "dtype": str(pipe.dtype).removeprefix("torch.")}
    if kind == "class" and request.source.class_names and condition is not None:
        params["class_name"] = request.source.class_names[condition]
    if "eta" in o:
        params["eta"] = o["eta"]
    params.update({k: o[k] for k in SIZE_FIELDS if k in o})
    if pipe.source.get("config") or pipe.source.get("controlnet"):
        params.update(config=pipe.source.get("config"), controlnet=pipe.source.get("controlnet"))
    if "control" in o:
        params.update(control=str(o["control"]), control_scale=o["control_scale"], guess_mode=o["guess_mode"])
    if "classifier_scale" in o:
        params.update(classifier=pipe.source.get("classifier"), classifier_scale=o["classifier_scale"])
    if pipe.source.get("lora"):
        params["lora"] = pipe.source["lora"]
    params["lineage"] = lineage_of(pipe.source.get("run"), pipe.source.get("checkpoint"), pipe.source)  # what drew it
    return params


def shown_condition(request: Request, condition):
    """A prompt as is; a class label as its name when the run keeps names (``seven``), else its index."""
    names = request.source.class_names
    return names[condition] if names and request.source.condition_key == "label" else condition


def save(parts: Iterable[Generation], request: Request, pipe: Pipeline, out: Path, grid: bool, n: int) -> list[Path]:
    """Write each image as its batch arrives (index, seed and prompt in its name), then a grid; print where."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create --out {out}: {e.strerror or e}") from e
    start = next_index(out)
    paths, kept = [], []
    for part in parts:
        for image, seed, condition in zip(part.images, part.seeds, part.conditions):
            shown = shown_condition(request, condition)
            path = out / f"{start + len(paths):0{INDEX_DIGITS}d}-s{seed}-{slug(shown)}.png"
            save_image_atomic(image, path, pnginfo=png_info(image_parameters(request, pipe, condition, seed)))
            paths.append(path)
            kept += [image] if grid else []
            print(f"{path}  seed={seed}  {json.dumps(shown, ensure_ascii=False)}", flush=True)
    if len(kept) > 1:
        ncol = n if 1 < n <= 2 * GRID_MAX_COLUMNS else min(len(kept), GRID_MAX_COLUMNS)
        grid_image = image_grid([torch.stack([from_pil(im) for im in kept])], ncol=ncol)  # (N, 3, H, W) → grid
        params = {**image_parameters(request, pipe, request.conditions[0], request.seeds[0]),
                  "seeds": request.seeds, "conditions": request.conditions}  # as AUTOMATIC1111: the first image's
        grid_path = out / f"grid-{start:0{INDEX_DIGITS}d}.png"
        save_image_atomic(grid_image, grid_path, pnginfo=png_info(params))
        paths.append(grid_path)
        print(f"{grid_path}  grid of {len(kept)}", flush=True)
    return paths


def print_settings(request: Request, pipe: Pipeline) -> None:
    """The model, checkpoint, control and sampling settings, once, before sampling."""
    p = image_parameters(request, pipe, None, request.seeds[0])
    seeds = request.seeds
    lines = [f"run: {p['run']}" if p["run"] else f"config: {p.get('config') or '(carried by the checkpoint)'}",
             f"checkpoint: {p['checkpoint']} ({'EMA' if p['ema'] else 'raw'} weights, {p['dtype']}, {pipe.device})"]
    if p.get("controlnet"):
        lines.append(f"controlnet: {p['controlnet']}")
    for lora in p.get("lora") or []:
        lines.append(f"lora: {lora['file']} (scale {lora['scale']}, {lora['mode']})")
    lines.append(f"sampler: {p['sampler']}, steps: {p['steps']}, scale: {p['scale']}, guidance rescale: "
                 f"{p['guidance_rescale']}" + (f", eta: {p['eta']}" if "eta" in p else "") +
                 f", size: {p['width']}x{p['height']}")
    if "control" in p:
        lines.append(f"control: {p['control']}, control scale: {p['control_scale']}, guess mode: {p['guess_mode']}")
    lines += [f"negative prompt: {p['negative_prompt']!r}",
              f"seeds: {seeds[0]}..{seeds[-1]} ({len(seeds)} image{'s' if len(seeds) > 1 else ''})"]
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """parse → validate → load pipeline → generate → save; 0 on success, 2 on bad input."""
    setup_cli_logging()
    try:
        args = parse_args(argv)
        apply_threads(args.threads, announce=False)  # a one-line error stands alone
        request = validate(args)
        pipe = load_pipeline(args, request)
        print_settings(request, pipe)
        check_prompts(pipe, request)
        save(generate(pipe, request), request, pipe, Path(args.out), grid=not args.no_grid, n=args.n)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
