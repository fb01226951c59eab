"""serve.py's command line: which model, where to listen, the server's limits; then load, serve (or check)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ldm.core.errors import UserError
from ldm.core.logging import setup_cli_logging
from ldm.core.threads import add_threads_argument, apply_threads
from ldm.inference.loaders import DEFAULT_RUN
from ldm.serve.adapter import DEFAULT_BATCH_SIZE, ModelAdapter, ModelSource
from ldm.serve.app import create_app
from ldm.serve.form import Limits
from ldm.serve.jobs import DEFAULT_HISTORY, DEFAULT_QUEUE_LIMIT
from ldm.serve.server import DEFAULT_HOST, DEFAULT_PORT, Server, check_page
from ldm.serve.uploads import DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_MB, MEBIBYTE

EXIT_OK, EXIT_BAD_INPUT = 0, 2
DEFAULT_OUT = "outputs/serve"
CHECK_STEPS = 2
CHECK_PROMPT = "a red circle on a blue background"


class CLIError(UserError):
    """A bad command-line argument."""


class Parser(argparse.ArgumentParser):
    """argparse that raises CLIError (one line, no usage dump) instead of exiting."""

    def error(self, message: str):
        raise CLIError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command line: model, address, limits, output."""
    p = Parser(prog="serve.py", description="A web page that draws images from a run or a Stable Diffusion file.")
    model = p.add_argument_group("model (as txt2img.py)")
    model.add_argument("--run", help=f"a stage-2 or ControlNet run, or a .ckpt in one (default {DEFAULT_RUN})")
    model.add_argument("--ckpt", help="a Stable Diffusion checkpoint instead of a run")
    model.add_argument("--config", help="the inference config of --ckpt (default: guessed)")
    model.add_argument("--controlnet", help="a ControlNet file to load with --ckpt")
    model.add_argument("--lora-dir", help="a folder of LoRA files the page offers (folded in when chosen)")
    model.add_argument("--device", help="cpu, cuda, cuda:1, … (default: cuda if available)")
    model.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    model.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA ones")
    model.add_argument("--unsafe-load", action="store_true", help="allow pickles that run code (trusted files only)")
    model.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                       help="images drawn at once (default 1: each image then reproduces alone from its seed)")
    add_threads_argument(model)
    net = p.add_argument_group("address")
    net.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this "
                     "machine only; 0.0.0.0 opens the page to the network)")
    net.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free one")
    lim = p.add_argument_group("limits")
    lim.add_argument("--queue", type=int, default=DEFAULT_QUEUE_LIMIT,
                     help=f"requests queued or running at once; more are answered busy (default {DEFAULT_QUEUE_LIMIT})")
    lim.add_argument("--history", type=int, default=DEFAULT_HISTORY, help="finished requests kept for the page")
    lim.add_argument("--max-steps", type=int, default=Limits.max_steps)
    lim.add_argument("--max-size", type=int, default=Limits.max_side, help="pixels per side of an image")
    lim.add_argument("--max-images", type=int, default=Limits.max_images, help="images per request")
    lim.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, help="size of an uploaded image")
    lim.add_argument("--max-upload-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"folder the images are also written to (default {DEFAULT_OUT})")
    p.add_argument("--check", action="store_true", help="serve, draw one toy request through the page's API, exit")
    return p


def limits_from(args: argparse.Namespace) -> Limits:
    """The server's limits, each checked positive."""
    values = {"--queue": args.queue, "--history": args.history, "--max-steps": args.max_steps,
              "--max-size": args.max_size, "--max-images": args.max_images, "--max-upload-mb": args.max_upload_mb,
              "--max-upload-pixels": args.max_upload_pixels, "--batch-size": args.batch_size}
    for name, value in values.items():
        if not value > 0:
            raise CLIError(f"{name} must be positive, got {value}")
    return Limits(args.max_steps, args.max_size, args.max_images, int(args.max_upload_mb * MEBIBYTE),
                  args.max_upload_pixels)


def source_from(args: argparse.Namespace) -> ModelSource:
    """The model to load: --run (default runs/ldm/latest) or --ckpt with --config / --controlnet."""
    if args.run and args.ckpt:
        raise CLIError("give --run or --ckpt, not both")
    if not args.ckpt and (args.config or args.controlnet):
        raise CLIError("--config and --controlnet go with --ckpt (a run names its own)")
    run = None if args.ckpt else args.run or DEFAULT_RUN
    return ModelSource(run, args.ckpt, args.config, args.controlnet, args.device, args.dtype, not args.no_ema,
                       args.unsafe_load)


def check_fields(adapter: ModelAdapter) -> dict[str, str]:
    """The toy request ``--check`` sends: a prompt or the first class, two steps, seed 0."""
    what = {"class": adapter.info.class_names[0]} if adapter.info.condition_key == "label" else {"prompt": CHECK_PROMPT}
    return {**what, "steps": str(CHECK_STEPS), "seed": "0", "n": "1"}


def main(argv: Sequence[str] | None = None) -> int:
    """parse → load the model → serve (or check); 0 on success, 2 on bad input."""
    setup_cli_logging()
    try:
        args = build_parser().parse_args(argv)
        limits = limits_from(args)
        apply_threads(args.threads)
        adapter = ModelAdapter(source_from(args), args.batch_size)
        app = create_app(adapter, limits, args.queue, args.history, args.out, args.lora_dir)
        server = Server(app, args.host, args.port)
        if not args.check:
            server.serve_forever()
            return EXIT_OK
        server.start()
        try:
            # a ControlNet would need a control image: then the check loads the page only
            state = check_page(server.url, None if adapter.info.controlnet else check_fields(adapter))
        finally:
            server.stop()
        for image in state["images"]:
            print(f"check: {image['name']}  {image['command']}", flush=True)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK
