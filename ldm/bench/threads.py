"""Training speed against torch threads, on an idle machine and beside a second training.

Each measurement runs a stage's command line (``stages/train_*.py``) as a subprocess with ``--threads N`` and reads
the rate from its own progress lines (``… · 3.71 it/s · …``: steps since the first step over the time since, so set-up
is not counted). A run that has not reached its last step within the time limit is stopped and its latest line
counts. "Loaded" starts a second training first (the VAE default at one thread, as a user's other job would be)
and stops it afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

RATE = re.compile(r"step (\d+)/\d+ .*· ([0-9.]+) it/s")
LOADS = ("idle", "loaded")
LOAD_WARMUP_S = 20.0  # the second training is past its set-up and stepping by then
STOP_GRACE_S = 30.0


@dataclass(frozen=True)
class ThreadRow:
    """One measured cell: a stage at a thread count, idle or loaded."""

    stage: str
    threads: int
    load: str
    it_per_s: float
    steps: int
    load_average: float

    def cells(self) -> list[str]:
        """The row's Markdown cells."""
        return [self.stage, str(self.threads), self.load, f"{self.it_per_s:.3g}", str(self.steps),
                f"{self.load_average:.2f}"]


def last_rate(output: str) -> tuple[int, float] | None:
    """(step, it/s) of the last progress line that carries a rate, or None."""
    found = RATE.findall(output)
    return (int(found[-1][0]), float(found[-1][1])) if found else None


def stage_command(script: Path, threads: int, runs_dir: Path, args: Sequence[str]) -> list[str]:
    """The training command of one measurement."""
    return [sys.executable, str(script), "--threads", str(threads), "--runs-dir", str(runs_dir), *args]


def _stop(proc: subprocess.Popen) -> str:
    """Stop a training as Ctrl-C would (it saves a checkpoint) and return what it printed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def measure(command: list[str], limit_s: float, env: dict[str, str]) -> tuple[int, float]:
    """Run ``command`` until it ends or ``limit_s`` passes → (last step, it/s) from its progress lines."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + limit_s
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    output = _stop(proc)
    found = last_rate(output)
    if found is None:
        tail = "\n".join(output.strip().splitlines()[-5:])
        raise RuntimeError(f"no progress line with a rate from {' '.join(command)} within {limit_s:.0f} s:\n{tail}")
    return found


def start_load(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start the second training and give it time to reach its steps."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    time.sleep(LOAD_WARMUP_S)
    return proc


def run_bench(stages: dict[str, tuple[Path, list[str]]], threads: Sequence[int], loads: Sequence[str],
              limit_s: float, load_command: tuple[Path, list[str]]) -> list[ThreadRow]:
    """Every (stage, threads, load) cell, in that order; each run in a scratch runs folder."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # --threads decides
    rows = []
    with tempfile.TemporaryDirectory(prefix="ldm-threads-") as scratch:
        runs = Path(scratch)
        for load in loads:
            other = None
            if load == "loaded":
                other = start_load(stage_command(load_command[0], 1, runs / "load", load_command[1]), env)
            try:
                for name, (script, args) in stages.items():
                    for n in threads:
                        load_average = os.getloadavg()[0]
                        steps, rate = measure(stage_command(script, n, runs / f"{name}-{n}-{load}", args), limit_s, env)
                        rows.append(ThreadRow(name, n, load, rate, steps, load_average))
            finally:
                if other is not None:
                    _stop(other)
    return rows


def threads_table(rows: Sequence[ThreadRow]) -> str:
    """The rows as a Markdown table."""
    head = ["stage", "threads", "machine", "it/s", "steps timed", "load average at start"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)
