"""LoRA against full fine-tuning of the U-Net: trainable parameters, AdamW state, step time and activation memory.

    python scripts/bench_lora.py --threads 1 --out results/lora          # the benchmark's SD-layout U-Net, CPU
    python scripts/bench_lora.py --quick --out /tmp/lora                  # toy sizes: a smoke test

Writes OUT/lora.md (two tables: measured on the benchmark U-Net — 128 channels, batch 4, 32×32 latents —, and
counted at SD 1.5's width from configs/sd/v1-inference.yaml) and OUT/lora.csv. Step times are the median of
--repeats steps after --warmup, the four variants timed in alternation; activations are the peak bytes a step
allocates beyond weights, gradients and AdamW state. On a shared CPU pass --threads 1.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ldm.bench.lora import counted_at, lora_csv, lora_table, measure_lora
from ldm.bench.sizes import DEFAULT, QUICK
from ldm.bench.steps import PRECISIONS, Options
from ldm.core.atomic import write_text_atomic
from ldm.core.config import load_config
from ldm.core.logging import setup_cli_logging
from ldm.inference.sd import SD_CONFIG_DIR

DEFAULT_WARMUP, DEFAULT_REPEATS = 1, 3
SD15_CONFIG = SD_CONFIG_DIR / "v1-inference.yaml"


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results") / "lora", help="folder for lora.md and lora.csv")
    p.add_argument("--quick", action="store_true", help="toy sizes, one repeat (a smoke test, not a measurement)")
    p.add_argument("--precision", default=",".join(PRECISIONS), help="comma-separated: fp32, bf16 (autocast)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help=f"untimed steps first (default {DEFAULT_WARMUP})")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help=f"timed steps (default {DEFAULT_REPEATS})")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 on a shared machine)")
    return p


def main(argv: Sequence[str] | None = None) -> str:
    """Measure, count, write OUT/lora.md and OUT/lora.csv; returns the Markdown."""
    setup_cli_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if not precisions or any(p not in PRECISIONS for p in precisions):
        raise SystemExit(f"error: --precision {args.precision!r}: choose from {', '.join(PRECISIONS)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else DEFAULT
    opts = Options(torch.device(args.device), 0 if args.quick else args.warmup, 1 if args.quick else args.repeats)
    start = time.perf_counter()
    measured = measure_lora(sizes, opts, precisions)
    sd15 = counted_at(load_config(SD15_CONFIG)["model"]["params"]["unet"]["params"])
    text = "\n".join([
        "# LoRA vs full fine-tuning of the U-Net", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {opts.device}, "
        f"{torch.get_num_threads()} thread(s), {time.perf_counter() - start:.0f} s in all.",
        "Command: `" + " ".join(["python scripts/bench_lora.py", *argv]) + "`", "",
        f"Benchmark U-Net (SD v1 layout, {sizes.unet['model_channels']} channels), batch {sizes.batch}, "
        f"{sizes.latent_size}×{sizes.latent_size} latents, {sizes.tokens} context tokens; fused AdamW over what trains; "
        f"median of {opts.repeats} step(s) after {opts.warmup}:", "",
        lora_table(measured, precisions), "",
        "SD 1.5's U-Net (configs/sd/v1-inference.yaml), counted:", "", lora_table(sd15, []), ""])
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "lora.md", text)
    rows = io.StringIO()
    csv.writer(rows).writerows([["width", "variant", "trainable", "total", "optimizer_bytes", "timings"]]
                               + lora_csv(measured, "bench") + lora_csv(sd15, "sd15"))
    write_text_atomic(args.out / "lora.csv", rows.getvalue())
    print(text)
    return text


if __name__ == "__main__":
    main()
