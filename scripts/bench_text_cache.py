"""Stage-2 step time and peak resident memory: frozen text encoder in the loop vs cached text embeddings.

    python scripts/bench_text_cache.py --arch ViT-B-32 --batch 8 --out results/text-cache
    python scripts/bench_text_cache.py --base small --batch 4 --out results/text-cache-base

Writes OUT/text_cache.md. Without --base the encoder is an open_clip text tower with random weights (same cost as
trained ones) over a small U-Net (64 channels, 16×16 latents), so the encoder's share is what this machine can show.
With --base, a fine-tune of that SD file (with --base-config), or of a small SD 1.x file written to OUT ("small": the
public CLIP ViT-L/14 text encoder over a small U-Net and VAE, random weights), loaded as a new run loads its base.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.bench import text_cache, text_cache_base
from ldm.bench.scale import measure_in_child
from ldm.core.atomic import write_text_atomic

SMALL = "small"


def main(argv: list[str] | None = None) -> None:
    """Measure both sides, each in its own process, then write the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ViT-B-32", help="open_clip architecture of the text tower (without --base)")
    p.add_argument("--base", help=f"a fine-tune's base SD file, or {SMALL!r}: a small SD 1.x file written to OUT")
    p.add_argument("--base-config", help="the base file's inference config (configs/sd/v1-inference.yaml, …)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("results") / "text-cache")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.base:
        if args.base != SMALL and not args.base_config:
            p.error("--base-config is required with a base file (its inference config)")
        base, config = (text_cache_base.write_small_base(args.out) if args.base == SMALL
                        else (Path(args.base), Path(args.base_config)))
        text_cache_base.prepare(args.out, base, config, args.batch)
        what = f"--base {args.base}" + (f" --base-config {args.base_config}" if args.base_config else "")
        fn, inputs = text_cache_base.step_time, (args.out, base, config, args.batch)
    else:
        text_cache.prepare(args.out, args.arch, args.batch)
        fn, inputs, what = text_cache.step_time, (args.out, args.arch, args.batch), f"--arch {args.arch}"
    rows = ["| text conditioning | step (s) | peak RSS (MiB) | RSS after the steps (MiB) | text encoder parameters "
            "built |", "|---|---|---|---|---|"]
    for name, cached in (("encoder in the loop", False), ("cached embeddings", True)):
        r = measure_in_child(fn, *inputs, cached)
        after = f"{r['rss_after_mib']:.0f}" if "rss_after_mib" in r else "–"
        rows.append(f"| {name} | {r['step_s']:.3f} | {r['rss_mib']:.0f} | {after} | {r['text_params']:,} |")
        print(rows[-1], flush=True)
    note = (f"Command: python scripts/bench_text_cache.py {what} --batch {args.batch} --out {args.out} "
            "(torch 1 thread; step = training_step + backward + AdamW, median of 5 after 1 warm-up)")
    write_text_atomic(args.out / "text_cache.md", "\n".join(["# Cached text embeddings", "", *rows, "", note]) + "\n")
    print(note)


if __name__ == "__main__":
    main()
