"""Launch a stage script in a child process forked from the test process: a real process (its own pid, signals,
exit code, kill -9) that skips the interpreter start and the imports a fresh one pays (~7 CPU-s: Lightning pulls in
torchmetrics, torchvision, scipy, transformers), since the test process has made them already.

The child runs ``stages/<stage>.py`` as ``__main__`` (``runpy``) with the environment and working directory
``tests.procs.launch`` gives a fresh interpreter, its stdout and stderr in the log, pytest's logging, capture,
signal handlers and exit handlers dropped. What forks is only the script's own process: the ranks a DDP run starts
(Lightning re-runs ``sys.executable`` on the script) are fresh interpreters as in production. A run that needs a
fresh interpreter itself (a ``sitecustomize`` on its path) goes through ``tests.procs.launch``.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import runpy
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

from tests.procs import POLL_S, STAGES, env
from tests.paths import REPO_ROOT


class ForkedProcess:
    """The parent's handle of a forked child: the part of ``subprocess.Popen`` the tests use."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        """The exit code (``-signal`` if a signal ended it) once the child has ended, else None."""
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child's end (polling); TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"forked process {self.pid} still running after {timeout} s")
            time.sleep(POLL_S)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the child if it still runs."""
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _exit_code(e: SystemExit) -> int:
    """The status a fresh interpreter exits with for ``SystemExit(e.code)``."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def _as_fresh_process(log: Path, extra_env: dict[str, str]) -> None:
    """In the child: output to ``log``, the launch environment, default signals, no inherited exit handlers or
    logging handlers (pytest's)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    sys.stdin = open(os.devnull)
    os.chdir(REPO_ROOT)
    os.environ.clear()
    os.environ.update(env(**extra_env))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    atexit._clear()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    torch.set_num_threads(1)  # OMP_NUM_THREADS=1, as a fresh interpreter of env() reads it


def _run_child(script: Path, args: list[str], log: Path, extra_env: dict[str, str]) -> None:
    """The child's whole life: run the script as ``__main__``, exit with its status (never returns)."""
    code = 1
    try:
        _as_fresh_process(log, extra_env)
        sys.argv = [str(script), *args]
        sys.path.insert(0, str(script.parent))  # as a fresh interpreter started on the script has it
        runpy.run_path(str(script), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException:  # noqa: BLE001 - a fresh interpreter prints the traceback and exits 1
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def launch_forked(stage: str, args: list[str], log: Path, **extra_env: str) -> ForkedProcess:
    """Start ``stages/<stage>.py args…`` in a forked child with its output in ``log`` (as ``tests.procs.launch``)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _run_child(STAGES / f"{stage}.py", args, log, extra_env)
    return ForkedProcess(pid)
