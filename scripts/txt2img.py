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
    python scripts/txt2img.py --init photo.png --strength 0.6 --prompt "…"        # image to image (SDEdit)
    python scripts/txt2img.py --init photo.png --mask mask.png --prompt "…"       # inpainting: white = repaint

--lora FILE[:SCALE] (repeatable; scale 1 by default) applies a LoRA file in kohya's or diffusers' layout to the U-Net
and text encoder: folded into the weights (--lora-mode fold, the default) or as live peft adapters (--lora-mode live).
A control or init image of any size and mode is converted to RGB and resized to the output size (by default an init
image's own size). Pickled checkpoints are read without running code from them; one that needs full unpickling is
refused unless --unsafe-load is given (only for files you trust).

Image i of a call starts from seed + i; the seed and every setting are printed and stored in each PNG's
text metadata ("parameters" in AUTOMATIC1111's style, "ldm" as JSON). Bad arguments exit with code 2
and a one-line ``error: …``. Flow: parse → request (checked against the model's config) → load → generate → save.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from ldm.core.errors import UserError
from ldm.core.logging import setup_cli_logging
from ldm.core.threads import add_threads_argument, apply_threads
from ldm.diffusion import SAMPLERS
from ldm.diffusion.sampling import FEW_STEPS, default_sampler
from ldm.inference.generation import image_parameters
from ldm.inference.loaders import PipelineError, resolve_class
from ldm.inference.outputs import encoding_warnings, save_generations, settings_text
from ldm.inference.pipeline import Pipeline
from ldm.inference.request import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONTROL_SCALE,
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    GenerationRequest,
    check_request,
)
from ldm.inference.request_names import CLI_NAMES
from ldm.inference.sources import (
    DescribedSource,
    ModelSource,
    add_source_arguments,
    describe_source,
    load_source,
    source_from_args,
)
from ldm.nets.compile import CompilerUnavailableError
from ldm.nets.conditioning.sdxl import SIZE_FIELDS

EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 2, 130
DEFAULT_OUT = "outputs"
SEED_RANGE = 2**31  # a random seed is drawn below this when none is given
DEFAULT_CLASSIFIER_SCALE = 1.0  # with the exact p(y | x), scale 1 samples p(x | y)
DEFAULT_STRENGTH = 0.75  # --init without --mask: how far from the picture (diffusers' img2img default is 0.8)
NEEDS = (("--control-scale", "control_scale", "--control IMAGE", "control"),
         ("--guess-mode", "guess_mode", "--control IMAGE", "control"),
         ("--classifier-scale", "classifier_scale", "--classifier RUN (a classifier trained with "
          "stages/train_classifier.py)", "classifier"),
         ("--strength", "strength", "--init IMAGE", "init"), ("--mask", "mask", "--init IMAGE", "init"))


class CLIError(UserError):
    """A bad command-line argument."""


class Parser(argparse.ArgumentParser):
    """argparse that raises CLIError (one line, no usage dump) instead of exiting."""

    def error(self, message: str):
        raise CLIError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command line, in groups: what to draw, sampling, model, control, editing, output."""
    p = Parser(prog="txt2img.py", description=__doc__.splitlines()[0])
    add = p.add_argument_group("what to draw").add_argument
    add("--prompt", action="append", default=[], help="a prompt (repeatable)")
    add("--from-file", metavar="FILE", help="prompts, one per line (blank lines skipped)")
    add("--class", dest="classes", action="append", default=[], metavar="NAME|INDEX",
        help="a class name (e.g. its folder's name) or index, for class-conditional runs (repeatable)")
    add("--negative-prompt", help="what to steer away from (text runs)")
    add("--n", type=int, default=1, help="images per prompt / class (default 1)")
    add = p.add_argument_group("sampling").add_argument
    add("--steps", type=int, default=DEFAULT_STEPS, help=f"sampler steps (default {DEFAULT_STEPS})")
    add("--sampler", choices=list(SAMPLERS),
        help=f"default {DEFAULT_SAMPLER}, or ddim at {FEW_STEPS} steps or fewer (where it reads better)")
    add("--scale", type=float, default=DEFAULT_GUIDANCE,
        help=f"classifier-free guidance scale; 1 = no guidance (default {DEFAULT_GUIDANCE})")
    add("--guidance-rescale", type=float, default=0.0, help="CFG rescale φ in [0, 1] (Lin et al. 2023)")
    add("--eta", type=float, help="noise of DDIM (0 = deterministic) or Euler-ancestral")
    add("--seed", type=int, help="seed of the first image; image i gets seed + i (default: random)")
    add("--H", type=int, help="height in pixels (default: the run's image size, or the init image's)")
    add("--W", type=int, help="width in pixels (default: the run's image size, or the init image's)")
    for flag, names in (("--original-size", ("H", "W")), ("--crop-top-left", ("TOP", "LEFT")),
                        ("--target-size", ("H", "W"))):
        add(flag, type=int, nargs=2, metavar=names, help="SDXL's micro-conditioning in pixels (default: the image "
            "size; crop 0 0)")
    add("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"images drawn at once (default {DEFAULT_BATCH_SIZE})")
    model = add_source_arguments(p)
    add_threads_argument(model)
    model.add_argument("--compile", action="store_true", help="torch.compile the U-Net (and ControlNet), weights "
                       "frozen: the first batch compiles (tens of seconds), later ones run faster; pays off for many images")
    add = p.add_argument_group("classifier guidance (class and unconditional runs)").add_argument
    add("--classifier", metavar="RUN", help="a noise-aware classifier run (stages/train_classifier.py) "
        "that steers each image toward its --class")
    add("--classifier-scale", type=float, help="its scale s (default 1): s·∇ log p(class | x) added")
    add = p.add_argument_group("control (ControlNet models)").add_argument
    add("--control", metavar="IMAGE", help="the control image (e.g. an edge map); any size and mode: it is "
        "converted to RGB and resized to the output size")
    add("--control-scale", type=float, help=f"strength of the control residuals (default {DEFAULT_CONTROL_SCALE})")
    add("--guess-mode", action="store_true",
        help="control in the conditional branch only, scales decaying by depth (0.825^(12 - i))")
    add = p.add_argument_group("image to image, inpainting").add_argument
    add("--init", metavar="IMAGE", help="start from this picture (SDEdit): encoded, noised, then sampled")
    add("--strength", type=float, help=f"how much to change it: 1 = from noise, 0 = the picture itself (default "
        f"{DEFAULT_STRENGTH}; 1 with --mask)")
    add("--mask", metavar="IMAGE", help="inpainting: white = repaint, black = keep (the --init image's size)")
    add = p.add_argument_group("output").add_argument
    add("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT}/)")
    add("--no-grid", action="store_true", help="do not write the grid image")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line (CLIError on a bad one); no --sampler: DDIM at few steps, else DPM-Solver++(2M)."""
    args = build_parser().parse_args(argv)
    args.sampler = args.sampler or default_sampler(args.steps)
    return args


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


def check_arguments(args: argparse.Namespace) -> None:
    """What the command line alone rules: --n, the device, options that need another one."""
    if args.n < 1:
        raise CLIError(f"--n must be at least 1, got {args.n}")
    for flag, dest, needed, key in NEEDS:
        if getattr(args, dest) not in (None, False) and getattr(args, key) is None:
            raise CLIError(f"{flag} needs {needed}")


def conditions_for(args: argparse.Namespace, model: DescribedSource) -> list:
    """The prompts or class labels the arguments ask for, checked against the kind of model."""
    prompts = list(args.prompt) + (read_prompts(args.from_file) if args.from_file else [])
    caps = model.capabilities
    if caps.is_class_model:
        if prompts or args.negative_prompt is not None:
            flag = "--negative-prompt" if not prompts else "--prompt/--from-file"
            raise CLIError(f"{model.name} is a class-conditional run: use --class NAME or INDEX, not {flag}")
        if not args.classes:
            raise CLIError("give at least one --class NAME or INDEX for this class-conditional run")
        try:
            return [resolve_class(c, list(caps.class_names or []) or None, caps.n_classes) for c in args.classes]
        except PipelineError as e:
            raise CLIError(f"{Path(model.name).name}: {e}") from None
    if args.classes:
        raise CLIError(f"{model.name} is a text-conditional run: use --prompt or --from-file, not --class")
    if args.classifier:
        raise CLIError("--classifier steers toward class labels: give a class (or unconditional) run and --class")
    if not prompts:
        raise CLIError("give --prompt TEXT (repeatable) or --from-file FILE")
    return prompts


def make_request(args: argparse.Namespace) -> tuple[ModelSource, DescribedSource, GenerationRequest]:
    """The model source and the request the arguments ask for, checked against the model's config before loading."""
    check_arguments(args)
    source = source_from_args(args, args.classifier)
    described = describe_source(source)
    conditions = [c for c in conditions_for(args, described) for _ in range(args.n)]  # each n times, in order
    request = GenerationRequest(
        conditions, negative=args.negative_prompt, height=args.H, width=args.W, steps=args.steps,
        sampler=args.sampler, sampler_options={} if args.eta is None else {"eta": args.eta},
        sizes={k: v for k in SIZE_FIELDS if (v := getattr(args, k)) is not None}, guidance=args.scale,
        guidance_rescale=args.guidance_rescale, batch_size=args.batch_size, loras=source.loras,
        seed=secrets.randbelow(SEED_RANGE) if args.seed is None else args.seed,
        control=args.control, guess_mode=args.guess_mode,
        control_scale=DEFAULT_CONTROL_SCALE if args.control_scale is None else args.control_scale,
        classifier_scale=0.0 if not args.classifier else
        DEFAULT_CLASSIFIER_SCALE if args.classifier_scale is None else args.classifier_scale,
        init_image=args.init, mask=args.mask,
        strength=(1.0 if args.mask or args.init is None else DEFAULT_STRENGTH) if args.strength is None else args.strength)
    try:
        check_request(request, described.capabilities, CLI_NAMES, before_loading=True, model=described.name)
    except PipelineError as e:
        raise CLIError(str(e)) from None
    return source, described, request


def load(args: argparse.Namespace, source: ModelSource, described: DescribedSource) -> Pipeline:
    """The pipeline, with its LoRA files and classifier; compiled with --compile."""
    pipe = load_source(source, described, args.device, args.dtype)
    if args.compile:
        try:
            pipe.compile()
        except CompilerUnavailableError as e:
            raise UserError(f"--compile: {e}") from e
    return pipe


def print_settings(pipe: Pipeline, request: GenerationRequest) -> None:
    """The model, checkpoint, control, editing and sampling settings, once, before sampling; truncation warnings."""
    plan = pipe.check(request)
    dtype = str(pipe.dtype).removeprefix("torch.")
    print(settings_text(image_parameters(plan, pipe.capabilities, pipe.source, dtype, None, request.seed),
                        pipe.device, request.seeds), flush=True)
    negative = [request.negative] if request.negative is not None else []
    for message in encoding_warnings(pipe.encode, plan.conditions + negative):  # the tokenizer warns once per prompt
        print(f"warning: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """parse → request → load → generate → save; 0 on success, 2 on bad input."""
    setup_cli_logging()
    try:
        args = parse_args(argv)
        apply_threads(args.threads, announce=False)  # a one-line error stands alone
        source, described, request = make_request(args)
        pipe = load(args, source, described)
        print_settings(pipe, request)
        names = pipe.capabilities.class_names
        parts = pipe.iter_generate(request, progress=sys.stderr.isatty())
        paths = save_generations(parts, Path(args.out), not args.no_grid, args.n, names, lambda path, seed, shown: print(
            f"{path}  seed={seed}  {json.dumps(shown, ensure_ascii=False)}", flush=True))
        if paths and paths[-1].name.startswith("grid-"):
            print(f"{paths[-1]}  grid of {len(paths) - 1}", flush=True)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
