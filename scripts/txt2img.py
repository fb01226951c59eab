"""Text (or class) to image from a trained stage-2 run: PNGs with their parameters, plus a grid.

    python scripts/txt2img.py --prompt "a red circle on a blue background"       # runs/ldm/latest
    python scripts/txt2img.py --run runs/ldm/<name> --prompt "…" --n 8 --steps 20 --sampler dpmpp_2m \\
           --scale 5 --negative-prompt "…" --seed 7 --out outputs/
    python scripts/txt2img.py --from-file prompts.txt --n 4
    python scripts/txt2img.py --run runs/ldm/<class-run> --class 3 --n 16

Image i of a call starts from seed + i; the seed and every setting are printed and stored in each PNG's
text metadata ("parameters" in AUTOMATIC1111's style, "ldm" as JSON). Bad arguments exit with code 2
and a one-line ``error: …``. Flow: parse → validate → load pipeline → generate → save.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import secrets
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from PIL.PngImagePlugin import PngInfo

from ldm.diffusion import SAMPLERS
from ldm.errors import UserError
from ldm.images import from_pil, image_grid, save_image_atomic
from ldm.pipeline import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_GUIDANCE,
    DEFAULT_RUN,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    Generation,
    Pipeline,
    RunSummary,
    describe_run,
)

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
DEFAULT_OUT = "outputs"
SEED_RANGE = 2**31  # a random seed is drawn below this when none is given
SLUG_CHARS = 48  # how much of a prompt goes into a file name
GRID_MAX_COLUMNS = 8
INDEX_DIGITS = 5
INDEXED_NAME = re.compile(rf"^(\d{{{INDEX_DIGITS}}})-")
PARAMETERS_KEY = "parameters"  # AUTOMATIC1111's PNG text key
JSON_KEY = "ldm"


class CLIError(UserError):
    """A bad command-line argument."""


class Parser(argparse.ArgumentParser):
    """argparse that raises CLIError (one line, no usage dump) instead of exiting."""

    def error(self, message: str):
        raise CLIError(message)


@dataclass
class Request:
    """What to draw, validated: conditions (one per image), seeds and the pipeline's options."""

    conditions: list  # prompts (text run) or class labels (class run), each repeated n times
    seeds: list[int]
    options: dict  # keyword arguments of Pipeline.generate
    run: RunSummary


# ---------------------------------------------------------------------------------------------- parse


def build_parser() -> argparse.ArgumentParser:
    """The command line, in groups (later: a `control` group for ControlNet, --ckpt/--config for SD files)."""
    p = Parser(prog="txt2img.py", description=__doc__.splitlines()[0])
    what = p.add_argument_group("what to draw")
    what.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    what.add_argument("--from-file", metavar="FILE", help="prompts, one per line (blank lines skipped)")
    what.add_argument("--class", dest="classes", type=int, action="append", default=[], metavar="INDEX",
                      help="a class index, for class-conditional runs (repeatable)")
    what.add_argument("--negative-prompt", help="what to steer away from (text runs)")
    what.add_argument("--n", type=int, default=1, help="images per prompt / class (default 1)")
    samp = p.add_argument_group("sampling")
    samp.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampler steps (default {DEFAULT_STEPS})")
    samp.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=list(SAMPLERS),
                      help=f"default {DEFAULT_SAMPLER}")
    samp.add_argument("--scale", type=float, default=DEFAULT_GUIDANCE,
                      help=f"classifier-free guidance scale; 1 = no guidance (default {DEFAULT_GUIDANCE})")
    samp.add_argument("--guidance-rescale", type=float, default=0.0, help="CFG rescale φ in [0, 1] (Lin et al. 2023)")
    samp.add_argument("--eta", type=float, help="noise of DDIM (0 = deterministic) or Euler-ancestral")
    samp.add_argument("--seed", type=int, help="seed of the first image; image i gets seed + i (default: random)")
    samp.add_argument("--H", type=int, help="height in pixels (default: the run's image size)")
    samp.add_argument("--W", type=int, help="width in pixels (default: the run's image size)")
    samp.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                      help=f"images drawn at once (default {DEFAULT_BATCH_SIZE})")
    model = p.add_argument_group("model")
    model.add_argument("--run", default=DEFAULT_RUN, help=f"stage-2 run directory or a .ckpt in one (default {DEFAULT_RUN})")
    model.add_argument("--device", help="cpu, cuda, cuda:1, … (default: cuda if available)")
    model.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="U-Net / VAE precision (default auto: bf16 on CUDA, fp32 on CPU)")
    model.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA ones")
    out = p.add_argument_group("output")
    out.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT}/)")
    out.add_argument("--no-grid", action="store_true", help="do not write the grid image")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line (CLIError on a bad one)."""
    return build_parser().parse_args(argv)


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


def check_size(args: argparse.Namespace, run: RunSummary) -> None:
    """--H / --W must be multiples of the VAE's factor (when its config tells it, before loading anything)."""
    factor = run.downsampling_factor
    for name, value in (("--H", args.H), ("--W", args.W)):
        if factor and value is not None and value % factor:
            raise CLIError(f"{name} {value} is not divisible by the VAE's downsampling factor {factor}")


def conditions_for(args: argparse.Namespace, run: RunSummary) -> list:
    """The prompts or class labels the arguments ask for, checked against the kind of run."""
    prompts = list(args.prompt) + (read_prompts(args.from_file) if args.from_file else [])
    if run.condition_key == "label":
        if prompts or args.negative_prompt is not None:
            flag = "--negative-prompt" if not prompts else "--prompt/--from-file"
            raise CLIError(f"{run.run_dir} is a class-conditional run: use --class INDEX, not {flag}")
        if not args.classes:
            raise CLIError("give at least one --class INDEX for this class-conditional run")
        out = [c for c in args.classes if run.n_classes is not None and not 0 <= c < run.n_classes]
        if out:
            raise CLIError(f"--class {out[0]} is out of range: {run.run_dir.name} has classes 0..{run.n_classes - 1}")
        return list(args.classes)
    if args.classes:
        raise CLIError(f"{run.run_dir} is a text-conditional run: use --prompt or --from-file, not --class")
    if not prompts:
        raise CLIError("give --prompt TEXT (repeatable) or --from-file FILE")
    return prompts


def validate(args: argparse.Namespace) -> Request:
    """Everything that can be checked before loading the models: numbers, run kind, conditions, size."""
    check_numbers(args)
    check_device(args)
    run = describe_run(args.run)
    check_size(args, run)
    base = conditions_for(args, run)
    conditions = [c for c in base for _ in range(args.n)]  # each prompt / class n times, in order
    seed = args.seed if args.seed is not None else secrets.randbelow(SEED_RANGE)
    options = dict(steps=args.steps, guidance=args.scale, sampler=args.sampler, height=args.H, width=args.W,
                   guidance_rescale=args.guidance_rescale, batch_size=args.batch_size, negative=args.negative_prompt)
    if args.eta is not None:
        options["eta"] = args.eta
    return Request(conditions, [seed + i for i in range(len(conditions))], options, run)


# ---------------------------------------------------------------------------------------------- load, generate


def load_pipeline(args: argparse.Namespace, request: Request) -> Pipeline:
    """The pipeline for --run (later also --ckpt/--config for public SD files)."""
    return Pipeline.from_run(request.run.checkpoint, device=args.device, dtype=args.dtype, use_ema=not args.no_ema)


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
    """Sample the request one batch at a time, with a progress bar."""
    return pipe.iter_generate(request.conditions, seed=request.seeds[0], progress=True, **request.options)


# ---------------------------------------------------------------------------------------------- save


def slug(condition) -> str:
    """A file-name-safe piece of a prompt (ASCII letters, digits and dashes only) or ``class<k>``."""
    if not isinstance(condition, str):
        return f"class{int(condition)}"
    return re.sub(r"[^a-z0-9]+", "-", condition.lower()).strip("-")[:SLUG_CHARS].strip("-") or "prompt"


def next_index(out: Path) -> int:
    """The first free image index in ``out`` (runs add to a folder, never overwrite)."""
    indices = [int(m.group(1)) for p in out.glob("*.png") if (m := INDEXED_NAME.match(p.name))]
    return max(indices, default=-1) + 1


def image_parameters(request: Request, pipe: Pipeline, condition, seed: int) -> dict:
    """Everything needed to redraw one image."""
    o = request.options
    kind = "class" if request.run.condition_key == "label" else "prompt"
    params = {kind: condition, "negative_prompt": o["negative"], "seed": seed, "steps": o["steps"],
              "sampler": o["sampler"], "scale": o["guidance"], "guidance_rescale": o["guidance_rescale"],
              "height": o["height"] or pipe.image_size, "width": o["width"] or pipe.image_size,
              "run": pipe.source.get("run"), "checkpoint": pipe.source.get("checkpoint"),
              "ema": pipe.source.get("ema"), "dtype": str(pipe.dtype).removeprefix("torch.")}
    if "eta" in o:
        params["eta"] = o["eta"]
    return params


def a1111_text(params: dict) -> str:
    """The parameters in AUTOMATIC1111's PNG-info style: prompt, negative prompt, then `Key: value, …`."""
    first = params.get("prompt", f"class {params.get('class')}")
    lines = [first] + ([f"Negative prompt: {params['negative_prompt']}"] if params.get("negative_prompt") else [])
    fields = {"Steps": params["steps"], "Sampler": params["sampler"], "CFG scale": params["scale"],
              "Seed": params["seed"], "Size": f"{params['width']}x{params['height']}",
              "Model": Path(params["run"]).name if params.get("run") else None}
    if params.get("guidance_rescale"):
        fields["CFG rescale"] = params["guidance_rescale"]
    if "eta" in params:
        fields["Eta"] = params["eta"]
    fields["Checkpoint"] = params.get("checkpoint")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def png_info(params: dict) -> PngInfo:
    """PNG text chunks: AUTOMATIC1111's `parameters` and the same as JSON."""
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, a1111_text(params))
    info.add_text(JSON_KEY, json.dumps(params, ensure_ascii=False))
    return info


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
            path = out / f"{start + len(paths):0{INDEX_DIGITS}d}-s{seed}-{slug(condition)}.png"
            save_image_atomic(image, path, pnginfo=png_info(image_parameters(request, pipe, condition, seed)))
            paths.append(path)
            kept += [image] if grid else []
            print(f"{path}  seed={seed}  {json.dumps(condition, ensure_ascii=False)}", flush=True)
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
    """The run, checkpoint and sampling settings, once, before sampling."""
    p = image_parameters(request, pipe, None, request.seeds[0])
    seeds = request.seeds
    print(f"run: {p['run']}\ncheckpoint: {p['checkpoint']} ({'EMA' if p['ema'] else 'raw'} weights, {p['dtype']}, "
          f"{pipe.device})\nsampler: {p['sampler']}, steps: {p['steps']}, scale: {p['scale']}, "
          f"guidance rescale: {p['guidance_rescale']}" + (f", eta: {p['eta']}" if "eta" in p else "") +
          f", size: {p['width']}x{p['height']}\nnegative prompt: {p['negative_prompt']!r}\n"
          f"seeds: {seeds[0]}..{seeds[-1]} ({len(seeds)} image{'s' if len(seeds) > 1 else ''})", flush=True)


# ---------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """parse → validate → load pipeline → generate → save; 0 on success, 2 on bad input."""
    try:
        args = parse_args(argv)
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
