"""GPU memory of one SDXL LoRA training step, counted on this CPU without a GPU and without weights.

    python scripts/bench_memory.py --out results/memory                     # SDXL at 1024², batch 1, rank 16
    python scripts/bench_memory.py --batch 1 4 --out results/memory

Builds the model of --config on the meta device, adds LoRA adapters (rank --rank on the U-Net's attention q, k, v,
out), and counts the live tensor bytes of one step op by op on fake tensors (ldm.bench.memory): frozen weights fp32
(Lightning's bf16-mixed) or bf16, text encoders on the GPU or cached embeddings, gradient checkpointing on or off.
Writes OUT/memory.md. Not counted: the CUDA context, the caching allocator's fragmentation and cuDNN / cuBLAS
workspaces.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ldm.core.atomic import write_text_atomic

SDXL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sd" / "xl-base-inference.yaml"
BASES = ("fp32", "bf16")  # the frozen weights' dtypes (ldm.bench.lora_memory.DTYPES)
TEXT_PLACES = ("cached", "gpu")


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(SDXL_CONFIG), help="inference config of the model (default: SDXL base)")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (latents: size / 8)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    p.add_argument("--base", nargs="+", default=list(BASES), choices=BASES,
                   help="dtype of the frozen weights: fp32 (bf16-mixed) and/or bf16")
    p.add_argument("--text", nargs="+", default=list(TEXT_PLACES), choices=TEXT_PLACES,
                   help="text encoders on the GPU and/or cached embeddings")
    p.add_argument("--checkpointing", nargs="+", default=["on", "off"], choices=["on", "off"])
    p.add_argument("--out", type=Path, default=Path("results") / "memory", help="folder for memory.md")
    return p


def main(argv: Sequence[str] | None = None) -> str:
    """Count every configuration, write OUT/memory.md, return its text."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.size % 8 or args.size < 8:
        raise SystemExit(f"error: --size {args.size}: give a multiple of 8 pixels")
    # deferred, so that --help and a bad argument answer at once: these import torch and Lightning (~10 s)
    import torch

    from ldm.bench.lora_memory import Setup, measure, memory_table
    from ldm.core.logging import setup_cli_logging

    setup_cli_logging()
    start, results = time.perf_counter(), []
    for base, text, ckpt, batch in itertools.product(args.base, args.text, args.checkpointing, args.batch):
        setup = Setup(batch=batch, checkpointing=ckpt == "on", base=base, text=text, rank=args.rank, size=args.size)
        results.append((setup, measure(args.config, setup)))
        print(f"{setup.describe()}: {results[-1][1].peak / 2**30:.2f} GiB", flush=True)
    text = "\n".join([
        f"# Memory of a LoRA training step ({Path(args.config).name}, {args.size}², rank {args.rank})", "",
        f"Counted {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, on fake tensors (no GPU, no weights), "
        f"{time.perf_counter() - start:.0f} s in all. Peak of live tensor bytes in GiB, each storage rounded to "
        "512 bytes as CUDA's caching allocator does; the split is taken at the peak.",
        "Command: `" + " ".join(["python scripts/bench_memory.py", *argv]) + "`", "",
        memory_table(results), ""])
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "memory.md", text)
    print(text)
    return text


if __name__ == "__main__":
    main()
