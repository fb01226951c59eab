"""Launch a stage script in a child process forked from the test process: a real process (its own pid, signals,
exit code, kill -9) that skips the interpreter start and the imports a fresh one pays (~7 CPU-s: Lightning pulls in
torchmetrics, torchvision, scipy, transformers), since the test process has made them already.

The child runs ``stages/<stage>.py`` as ``__main__`` (``runpy``) with the environment and working directory
``tests.procs.launch`` gives a fresh interpreter, its stdout and stderr in the log, pytest's logging, capture,
signal handlers and exit handlers dropped. The ranks a DDP / sharded run starts are forked too: Lightning's
launcher (``_SubprocessScriptLauncher``) starts each rank with ``subprocess.Popen(command, env=…)``; here that call
hands Lightning's command, environment and working directory to a child forked when the script started (so it holds
the state the script started from, not the launching rank's), which then runs the command's script and arguments
as ``__main__`` in exactly that environment, a child of the launching rank as Lightning's process is, its output in
the same log. Lightning's rank-zero flag, which a fresh interpreter reads from that environment at import, is read
again. ``fresh_ranks=True`` keeps Lightning's own launcher (fresh interpreters, as in production); a run that needs a
fresh interpreter itself (a ``sitecustomize`` on its path) goes through ``tests.procs.launch``.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import runpy
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

import lightning.pytorch.strategies.launchers.subprocess_script as lightning_launcher
import torch
from lightning.fabric.utilities.rank_zero import _get_rank, rank_zero_only

from tests.procs import POLL_S, STAGES, WAIT_S, env
from tests.paths import REPO_ROOT


class ForkedProcess:
    """The parent's handle of a forked child: the part of ``subprocess.Popen`` the tests use."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None
        self._lock = threading.Lock()  # Lightning's process observer polls a rank from its own thread

    def poll(self) -> int | None:
        """The exit code (``-signal`` if a signal ended it) once the child has ended, else None."""
        with self._lock:
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


def _as_fresh_process(logs: tuple[Path, Path], extra_env: dict[str, str]) -> None:
    """In the child: stdout and stderr to ``logs`` (the same file or two), the launch environment, default signals,
    no inherited exit handlers or logging handlers (pytest's)."""
    for target, log in zip((1, 2), logs):
        if target == 1 or log != logs[0]:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, target)
            os.close(fd)
        else:
            os.dup2(1, 2)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    sys.stdin = open(os.devnull)
    os.chdir(REPO_ROOT)
    launch_env = env(**extra_env)  # read before clearing: the test process's environment and the launch's additions
    os.environ.clear()
    os.environ.update(launch_env)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    atexit._clear()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    torch.set_num_threads(1)  # OMP_NUM_THREADS=1, as a fresh interpreter of env() reads it


WAIT_RANKS_S = WAIT_S  # how long a launching rank that succeeded waits for its forked ranks
RANK_GRACE_S = 10  # how long a failed launching rank waits for its forked ranks to end before killing them


class _ForkedRanks:
    """In the launching process: stands in for ``subprocess.Popen`` in Lightning's launcher module, handing each
    rank's command, environment and working directory to a child forked before the script ran."""

    def __init__(self, script: Path, waiting: list[tuple[int, int]]):
        self.script, self.waiting, self.started = script, waiting, []
        self.ranks = len(waiting) + 1

    def Popen(self, command: list[str], env: dict[str, str], cwd: str | None = None) -> ForkedProcess:  # noqa: N802
        """Start the next waiting child as Lightning's rank process ``command``."""
        if not self.waiting:
            raise RuntimeError(f"tests.forked: the run starts more than {self.ranks} ranks; "
                               f"pass launch_forked(ranks=…) its world size")
        if list(command[:2]) != [sys.executable, str(self.script)]:
            raise RuntimeError(f"tests.forked: Lightning launches {command[:2]}, not the script {self.script}")
        pid, fd = self.waiting.pop(0)
        request = json.dumps({"argv": list(command[2:]), "env": dict(env), "cwd": cwd or os.getcwd()}).encode()
        with os.fdopen(fd, "wb") as pipe:
            pipe.write(request)
        self.started.append(ForkedProcess(pid))
        return self.started[-1]

    def release(self, code: int) -> int:
        """Wait for the started ranks and the unstarted children (which end at their pipe's end); the exit code of
        the whole run: ``code``, or 1 if the launching rank succeeded and another did not."""
        for pid, fd in self.waiting:
            os.close(fd)
            os.waitpid(pid, 0)
        for proc in self.started:
            try:
                proc.wait(timeout=WAIT_RANKS_S if code == 0 else RANK_GRACE_S)
            except TimeoutError:
                proc.kill()
                proc.wait()
            if code == 0 and proc.returncode != 0:
                print(f"tests.forked: rank process {proc.pid} exited {proc.returncode}", file=sys.stderr)
                code = 1
        return code


def _fork_waiting_ranks(count: int) -> tuple[list[tuple[int, int]], dict | None]:
    """Fork ``count`` children that wait for a rank's launch request: in the launching process ((pid, pipe) of each,
    None); in a child that received its request ([], the request). A child whose pipe closes unused exits."""
    waiting = []
    for _ in range(count):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            for _, fd in waiting:
                os.close(fd)
            os.close(write)
            with os.fdopen(read, "rb") as pipe:
                request = pipe.read()
            if not request:
                os._exit(0)
            return [], json.loads(request)
        os.close(read)
        waiting.append((pid, write))
    return waiting, None


def _as_rank(request: dict) -> list[str]:
    """In a forked rank: Lightning's environment and working directory, its rank-zero flag read from them as a fresh
    interpreter's import reads it; the arguments of its command."""
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    rank_zero_only.rank = _get_rank() or 0
    print(f"tests.forked: process {os.getpid()} runs LOCAL_RANK={os.environ.get('LOCAL_RANK')}", file=sys.stderr)
    return request["argv"]


def _run_child(script: Path, args: list[str], logs: tuple[Path, Path], extra_env: dict[str, str], ranks: int,
               before: Callable[[], None] | None) -> None:
    """The child's whole life: run the script as ``__main__``, exit with its status (never returns)."""
    code, forked_ranks = 1, None
    try:
        _as_fresh_process(logs, extra_env)
        if before is not None:
            before()
        waiting, request = _fork_waiting_ranks(ranks - 1)
        if request is not None:
            args = _as_rank(request)
        elif waiting:
            forked_ranks = lightning_launcher.subprocess = _ForkedRanks(script, waiting)
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
            if forked_ranks is not None:
                code = forked_ranks.release(code)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def fork_script(script: Path, args: list[str], log: Path, ranks: int = 2, fresh_ranks: bool = False,
                before: Callable[[], None] | None = None, err: Path | None = None, **extra_env: str) -> ForkedProcess:
    """Start ``python script args…`` in a forked child with its output in ``log`` (as ``tests.procs.launch``; its
    stderr in ``err`` if given); up to ``ranks`` ranks of a distributed run forked too (see above), or,
    ``fresh_ranks``, Lightning's own; ``before`` runs in the child (in every rank) before the script."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _run_child(script, args, (log, err or log), extra_env, 1 if fresh_ranks else ranks, before)
    return ForkedProcess(pid)


def launch_forked(stage: str, args: list[str], log: Path, **options) -> ForkedProcess:
    """Start ``stages/<stage>.py args…`` in a forked child (``fork_script``'s options)."""
    return fork_script(STAGES / f"{stage}.py", args, log, **options)
