"""A LoRA's effect, side by side: each prompt drawn without and with it from the same seeds, in one grid.

    python scripts/compare_lora.py --ckpt outputs/shapes-text.safetensors --lora outputs/zorb-lora.safetensors \
           --prompt "a zorb" --prompt "a red circle on a blue background" --n 6 --out outputs/zorb-before-after.png

Rows: prompt 1 before, prompt 1 after, prompt 2 before, … (image j of every row from seed --seed + j); the legend
is written beside the grid as <out>.txt. --ckpt takes --config as txt2img.py does (default: guessed, or the config
an exported file carries); --run draws a run instead. --lora FILE[:SCALE] as in txt2img.py. --read (shapes models)
adds to each legend line how the images read back (ldm.eval.shapes_reader): the commonest fill-on-background pair,
and for a prompt in the shapes dataset's words how many images show exactly what it asks for.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from ldm.core.atomic import write_text_atomic
from ldm.core.errors import UserError
from ldm.core.images import image_grid, save_image_atomic
from ldm.core.logging import setup_cli_logging
from ldm.eval.shapes_reader import read_factors
from ldm.inference.lora_files import lora_spec
from ldm.inference.pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, Pipeline

# a prompt in the shapes dataset's first phrasing: what it asks for, to check the images against
CAPTION = re.compile(r"an? (?P<color>\w+) (?P<shape>\w+) on an? (?P<background>\w+) background")

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
    p.add_argument("--read", action="store_true", help="read the images back as shapes (colours, shape, adherence)")
    return p.parse_args(argv)


def reading(images: torch.Tensor, prompt: str) -> str:
    """How a row of shapes images (N, 3, H, W) reads back: its commonest fill-on-background pair, and how many show
    exactly what the prompt asks for when it names a shape, a colour and a background."""
    reads = [read_factors(image) for image in images]
    (pair, count), = Counter(f"{r['color']} on {r['background']}" for r in reads).most_common(1)
    text = f"commonest colours {pair} {count}/{len(reads)}"
    asked = CAPTION.fullmatch(prompt)
    if asked:
        hits = sum(all(r[k] == asked[k] for k in ("shape", "color", "background")) for r in reads)
        text += f", reads as the prompt {hits}/{len(reads)}"
    return text


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
    whens = ("without the LoRA", f"with {path} at {scale}")
    legend = [f"{p!r} {when}" + (f": {reading(images, p)}" if args.read else "")
              for p, pair in zip(args.prompt, zip(before, after)) for when, images in zip(whens, pair)]
    text = f"rows, top to bottom (seeds {args.seed}..{args.seed + args.n - 1} in every row):\n" + "\n".join(legend)
    write_text_atomic(args.out.with_suffix(".txt"), text + "\n")
    print(f"{text}\n{args.out}\n{args.out.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
