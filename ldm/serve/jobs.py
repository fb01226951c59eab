"""A bounded first-come, first-served queue of generation jobs with one worker thread.

Visitors take turns: ``submit`` appends a job (or raises ``Busy`` when ``limit`` jobs are already waiting or
running), one thread draws the jobs in order, and each job's state (queued with its place, running with its step,
done with its images, or failed with a one-line message) is read by the page. Finished jobs are kept for the page
to fetch, the oldest dropped beyond ``history``, so memory stays bounded however long the server runs.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ldm.core.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_QUEUE_LIMIT = 16  # jobs waiting or running; one more is answered "busy"
DEFAULT_HISTORY = 64  # finished jobs kept for the page


class Busy(UserError):
    """The queue is full: try again when a job has finished."""


class State(str, Enum):
    """Where a job is."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass
class Job:
    """One request and what became of it; ``results`` is whatever the worker's function returned."""

    id: int
    request: Any
    state: State = State.QUEUED
    step: int = 0
    total: int = 0
    results: Any = None
    error: str | None = None
    finished: int | None = None  # the order in which jobs finished (0, 1, …)
    done: threading.Event = field(default_factory=threading.Event)


Work = Callable[[Job], Any]  # draws job.request, may set job.step / job.total as it goes


class JobQueue:
    """Jobs in arrival order, drawn one at a time by a daemon thread running ``work``."""

    def __init__(self, work: Work, limit: int = DEFAULT_QUEUE_LIMIT, history: int = DEFAULT_HISTORY):
        if limit < 1 or history < 1:
            raise UserError(f"the queue limit and history must be at least 1, got {limit} and {history}")
        self.work, self.limit, self.history = work, limit, history
        self._ids, self._finished = itertools.count(), itertools.count()
        self._waiting: deque[Job] = deque()
        self._jobs: OrderedDict[int, Job] = OrderedDict()
        self._lock = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)
        self._thread.start()

    def submit(self, request: Any) -> Job:
        """Queue a request; ``Busy`` when ``limit`` jobs are already waiting or running."""
        with self._lock:
            active = len(self._waiting) + sum(job.state is State.RUNNING for job in self._jobs.values())
            if active >= self.limit:
                raise Busy(f"busy: {active} requests are queued or running (the limit is {self.limit}); "
                           "try again in a moment")
            job = Job(next(self._ids), request)
            self._waiting.append(job)
            self._jobs[job.id] = job
            self._lock.notify()
            return job

    def get(self, job_id: int) -> Job | None:
        """A job still kept (queued, running, or among the last ``history`` finished)."""
        with self._lock:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int:
        """How many jobs are ahead of a queued one (0 when it runs or has finished)."""
        with self._lock:
            ahead = [j for j in self._waiting if j.id < job.id]
            running = any(j.state is State.RUNNING for j in self._jobs.values())
            return len(ahead) + running if job.state is State.QUEUED else 0

    def stop(self, timeout: float | None = None) -> None:
        """Let the current job finish, drop the waiting ones, and end the worker."""
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self._thread.join(timeout)

    def _next(self) -> Job | None:
        with self._lock:
            while not self._waiting and not self._stopped:
                self._lock.wait()
            if self._stopped:
                return None
            job = self._waiting.popleft()
            job.state = State.RUNNING
            return job

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                job.results = self.work(job)
                state = State.DONE
            except UserError as e:
                job.error = " ".join(str(e).split())
                log.warning("job %d refused: %s", job.id, job.error)
                state = State.FAILED
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the server
                job.error = f"internal error ({type(e).__name__}): {' '.join(str(e).split())}"
                log.exception("job %d failed", job.id)
                state = State.FAILED
            with self._lock:
                job.state, job.finished = state, next(self._finished)
                job.request = None  # its uploads are no longer needed
                self._forget_old()
            job.done.set()

    def _forget_old(self) -> None:
        """Drop the oldest finished jobs beyond ``history`` (called with the lock held)."""
        finished = [i for i, j in self._jobs.items() if j.state in (State.DONE, State.FAILED)]
        for job_id in finished[:max(0, len(finished) - self.history)]:
            del self._jobs[job_id]
