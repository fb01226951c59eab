"""The test suite's own time, revision against revision: each revision checked out beside the repository, each tier
run with the test command that revision's README gives, one after the other on the same machine.

A tier is a pytest marker selection (``quick``: ``-m "not slow"``; ``whole``: everything). Wall time and pytest's
own figure are read per run, and the CPU time of every process the run started (pytest, its workers and their
subprocesses, as the kernel accounts them once they are waited for).
"""

from __future__ import annotations

import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

TIERS = {"quick": ["-m", "not slow"], "whole": []}
README_TEST_HEADING = "## Tests"
SUMMARY = re.compile(r"^=* ?(?P<counts>(?:\d+ \w+(?:, )?)+|no tests ran) in (?P<seconds>[\d.]+)s", re.M)  # its last line
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


@dataclass(frozen=True)
class TierRun:
    """One tier of one revision: what ran, its counts and its times."""

    revision: str
    tier: str
    command: str
    counts: dict[str, int]
    pytest_s: float
    wall_s: float
    cpu_s: float
    exit_code: int
    round: int = 1  # with several rounds, each runs every revision's tier once, in the same order


def readme_test_command(tree: Path) -> list[str]:
    """The test command a revision's README gives (the first ``pytest`` line under its Tests heading)."""
    text = (tree / "README.md").read_text(encoding="utf-8")
    section = text.split(README_TEST_HEADING, 1)[1] if README_TEST_HEADING in text else ""
    for line in section.splitlines():
        if re.match(r"^(python -m )?pytest\b", line.strip()):
            return shlex.split(line.strip())
    raise ValueError(f"{tree / 'README.md'} gives no pytest command under '{README_TEST_HEADING}'")


def check_out(repo: Path, revision: str, dest: Path) -> Path:
    """A detached worktree of ``revision`` at ``dest``."""
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--force", "--detach", str(dest), revision],
                   check=True, capture_output=True, text=True)
    return dest


def remove_checkout(repo: Path, dest: Path) -> None:
    """Drop a worktree made by ``check_out``."""
    subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(dest)], check=False,
                   capture_output=True)


def parse_summary(output: str) -> tuple[dict[str, int], float]:
    """Counts by outcome and seconds from pytest's summary line (empty and nan when there is none)."""
    matches = list(SUMMARY.finditer(output))
    if not matches:
        return {}, float("nan")
    last = matches[-1]
    counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n)
              for n, kind in COUNT.findall(last.group("counts"))}
    return counts, float(last.group("seconds"))


INDUCTOR_CACHE = ".inductor-cache"  # a tree's own TorchInductor cache: each revision compiles its kernels cold


def tree_env(tree: Path) -> dict[str, str]:
    """The environment of a tree's test runs: its own package first, one torch thread, offline, compiled modules
    written (as a developer's machine does; ``PYTHONDONTWRITEBYTECODE`` would recompile them in every process), and
    its own empty TorchInductor cache (kernels another revision or run compiled would make its compile tests cheap)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tree / INDUCTOR_CACHE)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def warm(tree: Path, tests: Sequence[str] = ()) -> None:
    """Collect a tree's tests (or only ``tests``) once, untimed: its modules and pytest's rewritten test modules are
    compiled and cached before the first timed tier, as they are on every run after a checkout's first."""
    subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *tests],
                   cwd=tree, env=tree_env(tree), capture_output=True, check=False)


def run_tier(tree: Path, revision: str, tier: str, extra: Sequence[str] = (), log: Path | None = None) -> TierRun:
    """Run one tier of the checked-out ``tree`` with its README's test command (then ``extra`` arguments: options,
    test paths), one torch thread per process."""
    shown = [*readme_test_command(tree), *TIERS[tier], *extra]
    command = [*shown, "-p", "no:cacheprovider"]
    if command[0] == "pytest":
        command = [sys.executable, "-m", *command]
    env = tree_env(tree)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    counts, seconds = parse_summary(proc.stdout)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return TierRun(revision, tier, shlex.join(shown), counts, seconds, wall, cpu, proc.returncode)


def markdown_rows(runs: Sequence[TierRun]) -> list[str]:
    """The runs as a Markdown table, each tier's times as a ratio of the first revision's in the same round; with
    several rounds, a line per revision and tier with the median of its rounds' ratios."""
    lines = ["| round | revision | tier | command | passed | failed | skipped | pytest (s) | wall (s) | CPU (s) "
             "| pytest / first | wall / first | CPU / first |", "|" + "---|" * 13]
    first, ratios = {}, {}
    for r in runs:
        base = first.setdefault((r.tier, r.round), r)
        ratio = r.pytest_s / base.pytest_s
        ratios.setdefault((r.revision, r.tier), []).append(ratio)
        lines.append(f"| {r.round} | {r.revision} | {r.tier} | `{r.command}` | {r.counts.get('passed', 0)} "
                     f"| {r.counts.get('failed', 0) + r.counts.get('error', 0)} | {r.counts.get('skipped', 0)} "
                     f"| {r.pytest_s:.1f} | {r.wall_s:.1f} | {r.cpu_s:.1f} | {ratio:.2f} | {r.wall_s / base.wall_s:.2f} "
                     f"| {r.cpu_s / base.cpu_s:.2f} |")
    if len({r.round for r in runs}) > 1:
        lines += ["", "| revision | tier | pytest / first, each round | median |", "|---|---|---|---|"]
        lines += [f"| {rev} | {tier} | {', '.join(f'{x:.2f}' for x in xs)} | **{statistics.median(xs):.2f}** |"
                  for (rev, tier), xs in ratios.items()]
    return lines
