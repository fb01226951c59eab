"""Torch CPU threads for every stage and script: ``--threads N`` on the command line, ``threads:`` in a config.

On a small shared CPU torch's default (one thread per core) is the slow choice as soon as another process is
busy: every operator's threads wait for the one that was descheduled (README, "Threads": 18-22× slower training
with two threads while another training ran on this 2-core machine). ``auto`` therefore takes the cores the
load average leaves free, at least one: two on an idle 2-core machine, one as soon as another job runs.
Precedence: ``--threads``, then the config's ``threads:``, then ``$OMP_NUM_THREADS``, then ``auto``.
"""

from __future__ import annotations

import logging
import os

import torch

from ldm.core.cli import AUTO, OMP_ENV, THREADS_HELP, add_threads_argument  # noqa: F401 (the light half, re-exported)
from ldm.core.errors import UserError

log = logging.getLogger(__name__)


class ThreadsError(UserError, ValueError):
    """A thread count that is neither a positive integer nor 'auto'."""


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def free_cores() -> int:
    """Cores not busy with other work now: available cores minus the 1-minute load average, at least 1."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, round(available_cores() - load))


def resolve_threads(value: int | str | None, where: str = "--threads") -> int:
    """A thread count from ``N`` or ``auto``; None: ``$OMP_NUM_THREADS`` when set, else auto. One-line error if bad."""
    if value is None and os.environ.get(OMP_ENV, "").strip():
        value, where = os.environ[OMP_ENV], OMP_ENV
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return free_cores()
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or n < 1 or str(n) != str(value).strip():
        raise ThreadsError(f"{where}: expected a positive number of threads or {AUTO!r}, got {value!r}")
    return n


def apply_threads(value: int | str | None, where: str = "--threads", announce: bool = True) -> int:
    """Set torch's intra-op threads from ``value`` (see ``resolve_threads``), say so once (``announce``: a training
    stage's log keeps it; a short command's one-line error should stand alone); returns the count."""
    n = resolve_threads(value, where)
    torch.set_num_threads(n)
    if value is None and os.environ.get(OMP_ENV, "").strip():
        how = f"${OMP_ENV}"
    elif value is None or str(value).strip().lower() == AUTO:
        how = "auto: cores left free by the load"
    else:
        how = where
    if announce:
        log.info("threads: %d (%s; change with --threads N)", n, how)
    return n
