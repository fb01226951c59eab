"""A LoRA's effect, side by side: each prompt drawn without and with it from the same seeds, in one grid.

    python scripts/compare_lora.py --ckpt outputs/shapes-text.safetensors --lora outputs/zorb-lora.safetensors \
           --prompt "a zorb" --prompt "a red circle on a blue background" --n 6 --out outputs/zorb-before-after.png

Rows: prompt 1 before, prompt 1 after, prompt 2 before, … (image j of every row from seed --seed + j); the legend
is written beside the grid as <out>.txt. --ckpt takes --config as txt2img.py does (default: guessed, or the config
an exported file carries); --run draws a run instead. --lora FILE[:SCALE] as in txt2img.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from ldm.core.atomic import write_text_atomic
from ldm.core.errors import UserError
from ldm.core.images import image_grid, save_image_atomic
from ldm.core.logging import setup_cli_logging
from ldm.inference.lora_files import lora_spec
from ldm.inference.pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, Pipeline

EXIT_BAD_INPUT = 2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a Stable Diffusion file (or one scripts/export.py wrote)")
    source.add_argument("--run", help="a stage-2 run")
    p.add_argument("--config", help="the inference config of --ckpt")
    p.add_argument("--lora", required=True, metavar="FILE[:SCALE]", help="the LoRA file and its scale (default 1)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("--n", type=int, default=6, help="images per row (default 6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image of every row")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--sampler", default=DEFAULT_SAMPLER)
    p.add_argument("--scale", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale")
    p.add_argument("--out", type=Path, required=True, help="the grid (.png)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Draw before / after, write the grid and its legend; 0 on success, 2 on bad input."""
    setup_cli_logging()
    args = parse_args(argv)
    path, scale = lora_spec(args.lora)
    draw = dict(steps=args.steps, sampler=args.sampler, guidance=args.scale, seed=args.seed, batch_size=args.n)
    try:
        pipe = (Pipeline.from_run(args.run, device="cpu") if args.run else
                Pipeline.from_checkpoint(args.ckpt, args.config, device="cpu"))
        before = [pipe.generate_tensors([p] * args.n, **draw) for p in args.prompt]  # (n, 3, H, W) each
        pipe.with_lora(path, scale)
        after = [pipe.generate_tensors([p] * args.n, **draw) for p in args.prompt]
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    rows = [row for pair in zip(before, after) for row in pair]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_image_atomic(image_grid([torch.cat(rows)], ncol=args.n), args.out)
    legend = [f"{p!r} {when}" for p in args.prompt for when in ("without the LoRA", f"with {path} at {scale}")]
    write_text_atomic(args.out.with_suffix(".txt"), "rows, top to bottom (seeds "
                      f"{args.seed}..{args.seed + args.n - 1} in every row):\n" + "\n".join(legend) + "\n")
    print(f"{args.out}\n{args.out.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
