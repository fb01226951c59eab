"""Stage-2 step time and peak resident memory: frozen text encoder in the loop vs cached text embeddings.

    python scripts/bench_text_cache.py --arch ViT-B-32 --batch 8 --out results/text-cache

Writes OUT/text_cache.md. The encoder is an open_clip text tower with random weights (same cost as trained ones);
the U-Net is small (64 channels, 16×16 latents), so the encoder's share is what this machine can show.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.bench.scale import measure_in_child
from ldm.bench.text_cache import prepare, step_time
from ldm.core.atomic import write_text_atomic


def main(argv: list[str] | None = None) -> None:
    """Measure both sides, each in its own process, then write the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ViT-B-32", help="open_clip architecture of the text tower")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("results") / "text-cache")
    args = p.parse_args(argv)
    prepare(args.out, args.arch, args.batch)
    rows = ["| text conditioning | step (s) | peak RSS (MiB) | text encoder parameters built |", "|---|---|---|---|"]
    for name, cached in (("encoder in the loop", False), ("cached embeddings", True)):
        r = measure_in_child(step_time, args.out, args.arch, args.batch, cached)
        rows.append(f"| {name} | {r['step_s']:.3f} | {r['rss_mib']:.0f} | {r['text_params']:,} |")
        print(rows[-1], flush=True)
    note = (f"Command: python scripts/bench_text_cache.py --arch {args.arch} --batch {args.batch} --out {args.out} "
            "(torch 1 thread; step = training_step + backward + AdamW, median of 5 after 1 warm-up)")
    write_text_atomic(args.out / "text_cache.md", "\n".join(["# Cached text embeddings", "", *rows, "", note]) + "\n")
    print(note)


if __name__ == "__main__":
    main()
