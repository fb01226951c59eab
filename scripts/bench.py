"""Speed side by side with diffusers, in one process: writes bench.md (Markdown table + notes) and bench.csv.

    pip install -e .[bench]
    python scripts/bench.py --out results/bench                 # small SD-like sizes, fp32 and bf16 autocast
    python scripts/bench.py --quick --out /tmp/bench             # toy sizes, 2 repeats, aot_eager: a smoke test
    python scripts/bench.py --only unet,sampling --compile --channels-last --profile

Each number is the median of ``--repeats`` timed calls after ``--warmup`` calls, the two sides of a row timed
in alternation. Rows: U-Net training step and its FLOP/s vs the matmul peak and peak memory (ours vs
diffusers' UNet2DConditionModel of the same architecture and weights), gradient checkpointing vs none,
channels-last vs contiguous, compiled vs eager (``compile: true``), fused vs default AdamW, attention under
bf16 autocast (fp32 compute on CPU) vs torch's bf16 kernel, VAE encode / decode (ours vs diffusers'
AutoencoderKL), stage-2 step on cached latents vs on-the-fly encoding at f = 8, and sampling images/s (our
DPM-Solver++(2M) vs diffusers' DPMSolverMultistepScheduler: both eager, ours compiled vs diffusers eager,
both compiled). On a shared CPU pass ``--threads 1``: idle-waiting OpenMP threads of a loaded machine can
make every number 10× slower and the ratios meaningless.
``ratio`` = ours / theirs: above 1 is faster for rates, below 1 is smaller for memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ldm.bench.report import Row, cpu_name, write_csv, write_markdown
from ldm.bench.sizes import DEFAULT, QUICK, BenchSizes
from ldm.bench.steps import PRECISIONS, Options
from ldm.core.logging import setup_cli_logging
from ldm.core.threads import ThreadsError, add_threads_argument, apply_threads
from ldm.nets.compile import INDUCTOR

MEASUREMENTS = ("unet", "checkpointing", "channels_last", "compiled_step", "optimizer", "attention", "vae",
                "stage2", "sampling")
DEFAULT_WARMUP, DEFAULT_REPEATS = 2, 5
QUICK_WARMUP, QUICK_REPEATS = 1, 2
# --quick compiles with AOT autograd's eager backend: Dynamo's capture and the backward graph of the real run,
# without TorchInductor generating and building C++ kernels (minutes of g++ on a CPU even for the toy U-Net)
QUICK_BACKEND = "aot_eager"
BACKENDS = (INDUCTOR, "aot_eager")
SPEED_GOAL = 1.2  # goal: ours ≥ 1.2× diffusers on the U-Net step and on sampling
CACHE_GOAL = 3.0  # goal: cached latents ≥ 3× on-the-fly encoding at f = 8
# Rows (by the start of their measurement name) that have a goal, and the ratio to reach.
GOALS = (("U-Net train step (fwd+bwd+AdamW), ours vs diffusers", SPEED_GOAL),
         ("sampling DPM-Solver++(2M)", SPEED_GOAL), ("stage-2 train step, cached latents", CACHE_GOAL))


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results") / "bench", help="folder for bench.md and bench.csv")
    p.add_argument("--quick", action="store_true", help="toy sizes and 2 repeats (a smoke test, not a measurement)")
    p.add_argument("--only", default=",".join(MEASUREMENTS), help=f"comma-separated subset of {','.join(MEASUREMENTS)}")
    p.add_argument("--precision", default=",".join(PRECISIONS), help="comma-separated: fp32, bf16 (autocast)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, help=f"untimed calls first (default {DEFAULT_WARMUP}, quick {QUICK_WARMUP})")
    p.add_argument("--repeats", type=int, help=f"timed calls (default {DEFAULT_REPEATS}, quick {QUICK_REPEATS})")
    p.add_argument("--batch", type=int, help="batch size (default: the sizes' own)")
    p.add_argument("--latent-size", type=int, help="latent side (images are 8× larger)")
    add_threads_argument(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both sides of the training and VAE rows (sampling always has compiled rows)")
    p.add_argument("--compile-backend", choices=BACKENDS,
                   help=f"what the compiled rows compile with (default {INDUCTOR}, quick {QUICK_BACKEND})")
    p.add_argument("--channels-last", action="store_true", help="channels-last weights and inputs on both sides")
    p.add_argument("--profile", action="store_true", help="write torch.profiler op tables of the U-Net steps to OUT/profiles")
    return p


def _choices(text: str, allowed: Sequence[str], what: str) -> list[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in chosen if c not in allowed]
    if bad or not chosen:
        raise SystemExit(f"error: --{what} {text!r}: choose from {', '.join(allowed)}")
    return chosen


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def machine_lines(opts: Options, sizes: BenchSizes, args: argparse.Namespace, argv: Sequence[str]) -> list[str]:
    """Preamble of bench.md: the machine, versions, the command, sizes and options."""
    import diffusers

    quick = " (--quick: toy sizes, numbers are a smoke test)" if args.quick else ""
    return [
        (f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {device_name(opts.device)} ({torch.get_num_threads()} CPU "
         f"threads), torch {torch.__version__}, diffusers {diffusers.__version__}."),
        "Command: `" + " ".join(["python scripts/bench.py", *argv]) + "`",
        (f"Sizes{quick}: batch {sizes.batch}, {sizes.latent_size}×{sizes.latent_size} latents, U-Net {sizes.unet}, "
         f"VAE ch {sizes.vae['ch']} × {sizes.vae['ch_mult']}; median of {opts.repeats} after {opts.warmup} warm-up; "
         f"compile={opts.compile} (backend {opts.backend}), channels_last={opts.channels_last}. ratio = ours / theirs."),
    ]


def goal_notes(rows: Sequence[Row]) -> list[str]:
    """One line per goal: met or not, per precision."""
    notes = []
    for prefix, goal in GOALS:
        for r in rows:
            if r.measurement.startswith(prefix):
                verdict = "met" if r.ratio >= goal else "NOT met"
                notes.append(f"Goal ≥ {goal}× for {r.measurement} ({r.precision}): {r.ratio:.2f}× — {verdict}.")
    return notes


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the chosen measurements; write OUT/bench.md and OUT/bench.csv; print the table."""
    setup_cli_logging()
    from ldm.bench.attention import measure_attention
    from ldm.bench.measures import (
        measure_channels_last,
        measure_checkpointing,
        measure_compiled_step,
        measure_optimizer,
        measure_stage2,
        measure_unet,
        measure_vae,
    )
    from ldm.bench.report import markdown_table
    from ldm.bench.sampling import measure_sampling

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    only = _choices(args.only, MEASUREMENTS, "only")
    precisions = _choices(args.precision, PRECISIONS, "precision")
    sizes = (QUICK if args.quick else DEFAULT).with_options(batch=args.batch, latent_size=args.latent_size)
    warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP)
    repeats = args.repeats if args.repeats is not None else (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    if repeats < 1 or warmup < 0:
        raise SystemExit("error: --repeats must be ≥ 1 and --warmup ≥ 0")
    try:
        apply_threads(args.threads)
    except ThreadsError as e:
        raise SystemExit(f"error: {e}") from None
    backend = args.compile_backend or (QUICK_BACKEND if args.quick else INDUCTOR)
    opts = Options(torch.device(args.device), warmup, repeats, args.compile, args.channels_last, backend)
    args.out.mkdir(parents=True, exist_ok=True)
    profile_dir = args.out / "profiles" if args.profile else None

    rows: list[Row] = []
    notes: list[str] = []
    runners = {
        "unet": lambda: measure_unet(sizes, opts, precisions, notes, profile_dir),
        "checkpointing": lambda: measure_checkpointing(sizes, opts, precisions),
        "channels_last": lambda: measure_channels_last(sizes, opts, precisions),
        "compiled_step": lambda: measure_compiled_step(sizes, opts, precisions),
        "optimizer": lambda: measure_optimizer(sizes, opts),
        "attention": lambda: measure_attention(sizes, opts, precisions),
        "vae": lambda: measure_vae(sizes, opts, precisions, notes),
        "stage2": lambda: measure_stage2(sizes, opts, precisions, notes),
        "sampling": lambda: measure_sampling(sizes, opts, precisions, notes),
    }
    for name in only:
        start = time.perf_counter()
        rows += runners[name]()
        print(f"[bench] {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    write_csv(rows, args.out / "bench.csv")
    write_markdown(rows, args.out / "bench.md", "ldm vs diffusers: speed side by side",
                   machine_lines(opts, sizes, args, argv), notes + goal_notes(rows))
    print(markdown_table(rows))
    print(f"wrote {args.out / 'bench.md'} and {args.out / 'bench.csv'}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
