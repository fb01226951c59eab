"""Training it/s of the VAE and stage-2 defaults at 1 and 2 torch threads, idle and beside a second training.

    python scripts/bench_threads.py --out results/threads

Each cell runs the stage's own command (`stages/train_vae.py`, `stages/train_ldm.py`) with `--threads N` for
--steps steps or --limit seconds, whichever comes first, and takes the rate from its progress lines. "loaded" runs
a second training (the VAE default, one thread) beside it, as another job of yours would. Stage 2 needs its latent
cache (built from runs/vae/latest on first use, before the timing starts). Writes OUT/threads.md; run it with
nothing else running, or the idle rows are not idle (the load average at each start is in the table).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ldm.bench.threads import LOADS, run_bench, threads_table
from ldm.core.atomic import write_text_atomic
from ldm.core.logging import setup_cli_logging

STAGES_DIR = Path(__file__).resolve().parents[1] / "stages"
STAGE_SCRIPTS = {"vae": STAGES_DIR / "train_vae.py", "ldm": STAGES_DIR / "train_ldm.py"}
DEFAULT_STEPS, DEFAULT_LIMIT_S = 300, 120.0


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results") / "threads", help="folder for threads.md")
    p.add_argument("--stages", nargs="+", choices=sorted(STAGE_SCRIPTS), default=["vae", "ldm"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="thread counts to time (default 1 2)")
    p.add_argument("--loads", nargs="+", choices=LOADS, default=list(LOADS))
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"steps per cell (default {DEFAULT_STEPS})")
    p.add_argument("--limit", type=float, default=DEFAULT_LIMIT_S,
                   help=f"seconds per cell at most; the latest progress line counts (default {DEFAULT_LIMIT_S:g})")
    p.add_argument("--cfg", action="append", default=[], metavar="STAGE=YAML", help="another config for a stage")
    p.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="config override for every timed run and the second training (repeatable)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Time every cell and write the table."""
    setup_cli_logging()
    args = build_parser().parse_args(argv)
    if any(n < 1 for n in args.threads) or args.steps < 2 or args.limit <= 0:
        print("error: --threads must be ≥ 1, --steps ≥ 2 and --limit > 0", file=sys.stderr)
        return 2
    configs = dict(item.split("=", 1) for item in args.cfg)
    unknown = set(configs) - set(STAGE_SCRIPTS)
    if unknown:
        print(f"error: --cfg {sorted(unknown)[0]}=…: stages are {', '.join(STAGE_SCRIPTS)}", file=sys.stderr)
        return 2
    common = [f"trainer.max_steps={args.steps}", "trainer.limit_val_batches=1",
              "trainer.enable_progress_bar=true", "callbacks=[]", *args.set]
    stages = {name: (STAGE_SCRIPTS[name], (["--cfg", configs[name]] if name in configs else []) + common)
              for name in args.stages}
    load = (STAGE_SCRIPTS["vae"], (["--cfg", configs["vae"]] if "vae" in configs else []) + [
        "trainer.max_steps=1000000", "callbacks=[]", *args.set])
    rows = run_bench(stages, args.threads, args.loads, args.limit, load)
    when = time.strftime("%Y-%m-%d %H:%M")
    text = (f"# Training speed against threads\n\nMeasured {when}, torch {torch.__version__}, "
            f"{len(os.sched_getaffinity(0))} cores. Command: `python scripts/bench_threads.py "
            f"{' '.join(sys.argv[1:] if argv is None else argv)}`\n\n{threads_table(rows)}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "threads.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
