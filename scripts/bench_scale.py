"""The data path at scale: cache build images/s (1 and 2 workers), loader throughput against what a GPU consumes,
peak resident memory at two dataset sizes (it must stay flat), shard bytes per image. Writes OUT/scale.md.

    python scripts/bench_scale.py --sizes 1000 10000 --out results/scale          # what this CPU affords
    python scripts/bench_scale.py --sizes 10000 100000 --out results/scale-full   # the full measurement

Images are procedural mixed-aspect JPEGs (short side 64 px) cached at --size px by the tiny VAE (random weights):
the per-image costs of the data path, not of a real VAE. The GPU's consumption is on paper: the GPU config's U-Net
training FLOPs per image (counted) at --utilisation of --gpu-tflops.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.bench.scale import (
    build,
    load_epoch,
    measure_in_child,
    needed_items_per_s,
    sd_step_flops_per_image,
    write_jpeg_folder,
)
from ldm.core.atomic import write_text_atomic
from ldm.core.config import load_config

GPU_CONFIG = "configs/ldm/folder-text-256.yaml"
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM (NVIDIA's datasheet)


def main(argv: list[str] | None = None) -> None:
    """Measure, then write the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[1000, 10000], help="dataset sizes (images)")
    p.add_argument("--out", type=Path, default=Path("results") / "scale")
    p.add_argument("--size", type=int, default=32, help="cached image size in pixels")
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="cache build workers")
    p.add_argument("--gpu-tflops", type=float, default=H100_BF16_TFLOPS)
    p.add_argument("--utilisation", type=float, default=0.4, help="share of the GPU's peak a training step reaches")
    args = p.parse_args(argv)
    batch = load_config(GPU_CONFIG)["data"]["params"]["batch_size"]
    rows = ["| images | measurement | workers | rate (items/s) | peak RSS main (MiB) | peak RSS workers (MiB) "
            "| shard bytes / image |", "|---|---|---|---|---|---|---|"]
    for n in args.sizes:
        folder = args.out / f"images-{n}"
        jpeg_bytes = write_jpeg_folder(folder, n)
        print(f"{n} images: {jpeg_bytes / n:.0f} JPEG bytes per image", flush=True)
        for fmt, workers in [("folder", 0)] + [("litdata", w) for w in args.workers]:
            cache = args.out / f"cache-{n}-{fmt}-w{workers}"
            r = measure_in_child(build, folder, cache, fmt, workers, args.size, 64, 4096)
            rows.append(f"| {n} | cache build ({fmt}) | {workers} | {r['images_per_s']:.0f} | {r['rss_mib']:.0f} "
                        f"| {r['worker_rss_mib']:.0f} | {r['shard_bytes_per_image']:.0f} |")
            print(rows[-1], flush=True)
        for fmt, workers in (("folder", 0), ("litdata", 0), ("litdata", 2)):
            cache = args.out / f"cache-{n}-{fmt}-w{0 if fmt == 'folder' else args.workers[0]}"
            r = measure_in_child(load_epoch, cache, fmt, workers, batch)
            rows.append(f"| {n} | loader epoch ({fmt}, batch {batch}) | {workers} | {r['items_per_s']:.0f} "
                        f"| {r['rss_mib']:.0f} | {r['worker_rss_mib']:.0f} | |")
            print(rows[-1], flush=True)
    flops = sd_step_flops_per_image(GPU_CONFIG)
    need = needed_items_per_s(flops, args.gpu_tflops * 1e12, args.utilisation)
    notes = [f"Command: python scripts/bench_scale.py --sizes {' '.join(map(str, args.sizes))} --out {args.out}",
             f"Cached at {args.size} px by the tiny VAE (configs/tiny/vae.yaml, random weights); torch 1 thread.",
             f"GPU consumption on paper: {GPU_CONFIG}'s U-Net trains at {flops / 1e9:.1f} GFLOP per image "
             f"(forward + backward, counted); at {args.utilisation:.0%} of {args.gpu_tflops:.0f} TFLOP/s one GPU "
             f"takes {need:.0f} images/s (batch {batch})."]
    write_text_atomic(args.out / "scale.md", "\n".join(["# Data path at scale", "", *rows, "", *notes]) + "\n")
    print("\n".join(notes))


if __name__ == "__main__":
    main()
