"""The test suite's time, revision against revision, back to back on this machine: each revision's README test
command per tier (quick: -m "not slow"; whole: everything). Writes OUT/tests.md (a table; times as ratios of the
first revision's in the same round) and each run's log.

    python scripts/bench_tests.py --revisions 9a6e319 HEAD --tiers quick whole --out results/tests
    python scripts/bench_tests.py --revisions 9a6e319 HEAD --tiers quick --rounds 3   # interleaved: A B A B A B

Run it on a quiet machine: the figures are wall and CPU time of everything each run started.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import tempfile
import time
from pathlib import Path

import torch

from ldm.bench.report import cpu_name
from ldm.bench.suite import TIERS, check_out, markdown_rows, remove_checkout, run_tier, warm
from ldm.core.atomic import write_text_atomic

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    """Check each revision out, run its tiers one after the other, write the table; 1 when a run failed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--revisions", nargs="+", default=["HEAD"], help="git revisions, the first is the reference")
    p.add_argument("--tiers", nargs="+", choices=sorted(TIERS), default=["quick"])
    p.add_argument("--tests", nargs="*", default=[], help="test paths to run instead of the whole folder (a smoke)")
    p.add_argument("--pytest-args", default="", help="more pytest arguments in one string, after the README's "
                                                     "(e.g. '-n 0': one process)")
    p.add_argument("--rounds", type=int, default=1, help="run every revision's tiers this many times, interleaved "
                                                          "(the machine's speed drifts: ratios within a round)")
    p.add_argument("--out", type=Path, default=Path("results") / "tests")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-tests-") as scratch:
        trees = {rev: check_out(REPO, rev, Path(scratch) / f"tree-{k}") for k, rev in enumerate(args.revisions)}
        try:
            for tree in trees.values():
                warm(tree, args.tests)
            for round_ in range(1, args.rounds + 1):
                for tier in args.tiers:
                    for rev, tree in trees.items():
                        print(f"round {round_}: {rev} {tier} …", flush=True)
                        log = args.out / f"{tier}-{rev.replace('/', '_')}-{round_}.log"
                        run = run_tier(tree, rev, tier, [*shlex.split(args.pytest_args), *args.tests], log)
                        print(f"  {run.counts} pytest {run.pytest_s:.1f} s, wall {run.wall_s:.1f} s, "
                              f"CPU {run.cpu_s:.1f} s", flush=True)
                        runs.append(dataclasses.replace(run, round=round_))
        finally:
            for tree in trees.values():
                remove_checkout(REPO, tree)
    lines = ["# Test suite time", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {cpu_name()} ({os.cpu_count()} cores, load average "
             f"{load:.2f} at the start), Python {platform.python_version()}, torch {torch.__version__}; one torch "
             "thread per test process; the runs one after the other (rounds interleaved).", "", *markdown_rows(runs), ""]
    write_text_atomic(args.out / "tests.md", "\n".join(lines))
    print("\n".join(lines))
    return 1 if any(r.exit_code != 0 for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
