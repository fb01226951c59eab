"""The generation queue alone (any work function): first come, first served; bounded with a busy answer; a failing
job is reported in one line and the worker goes on; finished jobs beyond the history are forgotten."""

import threading

import pytest

from ldm.core.errors import UserError
from ldm.serve.jobs import Busy, JobQueue, State

WAIT_S = 30.0


def test_jobs_run_in_arrival_order_and_report_results():
    seen = []
    queue = JobQueue(lambda job: seen.append(job.request) or job.request * 2, limit=8)
    jobs = [queue.submit(k) for k in range(6)]
    for job in jobs:
        assert job.done.wait(WAIT_S)
    assert seen == list(range(6)) and [j.results for j in jobs] == [0, 2, 4, 6, 8, 10]
    assert [j.finished for j in jobs] == list(range(6)) and all(j.state is State.DONE for j in jobs)
    queue.stop(WAIT_S)


def test_a_full_queue_is_busy_until_a_job_finishes():
    gate = threading.Event()
    queue = JobQueue(lambda job: gate.wait(WAIT_S), limit=2)
    first, second = queue.submit("a"), queue.submit("b")
    with pytest.raises(Busy, match="busy: 2 requests are queued or running"):
        queue.submit("c")
    assert queue.position(second) == 1  # one running ahead of it
    gate.set()
    assert first.done.wait(WAIT_S) and second.done.wait(WAIT_S)
    assert queue.submit("d").done.wait(WAIT_S)
    queue.stop(WAIT_S)


def test_failures_are_one_line_and_the_worker_goes_on():
    def work(job):
        if job.request == "bad":
            raise UserError("steps must be at least 1,\n got 0")
        if job.request == "broken":
            raise RuntimeError("out of memory")
        return "ok"

    queue = JobQueue(work)
    bad, broken, good = queue.submit("bad"), queue.submit("broken"), queue.submit("good")
    assert good.done.wait(WAIT_S)
    assert bad.state is State.FAILED and bad.error == "steps must be at least 1, got 0"
    assert broken.state is State.FAILED and broken.error == "internal error (RuntimeError): out of memory"
    assert good.state is State.DONE and good.results == "ok"
    queue.stop(WAIT_S)


def test_finished_jobs_beyond_the_history_are_forgotten():
    queue = JobQueue(lambda job: bytes(1000), limit=4, history=3)
    jobs = [queue.submit(k) for k in range(4)]
    assert jobs[-1].done.wait(WAIT_S)
    more = [queue.submit(k) for k in range(3)]
    assert more[-1].done.wait(WAIT_S)
    kept = [j.id for j in jobs + more if queue.get(j.id) is not None]
    assert kept == [j.id for j in more] and all(j.request is None for j in jobs)  # uploads dropped when done
    queue.stop(WAIT_S)
