"""Load on the web server (bounded, localhost only, stops by itself): N visitors post at once at toy size; every
request completes, in the order the server took them, and the server's memory stays flat from round to round."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from ldm.serve.adapter import ModelAdapter, ModelSource
from ldm.serve.app import create_app
from ldm.serve.server import Server

VISITORS = 8  # requests posted at once, per round (more than the queue's worker takes: they queue up)
ROUNDS = 3  # the first warms up; memory is compared between the later ones
GROWTH_LIMIT_MB = 25.0  # RSS growth allowed from round 2 to the last (allocator noise, not kept images)
TIMEOUT_S = 300.0
POLL_S = 0.02
PAGE_SIZE = 4096


def rss_mb() -> float:
    """This process's resident memory (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE / 2**20


@pytest.fixture(scope="module")
def server(toy_ldm_run):
    adapter = ModelAdapter(ModelSource(run=str(toy_ldm_run), device="cpu"))  # untrained: load, not quality
    app = create_app(adapter, queue_limit=VISITORS, history=VISITORS, out=None)  # nothing written: memory only
    server = Server(app, port=0).start()
    yield server
    server.stop()


def visit(url: str, seed: int, start: threading.Barrier) -> int:
    start.wait()
    answer = requests.post(url + "/api/generate", data={"prompt": f"a circle {seed}", "steps": "1", "n": "2",
                                                        "sampler": "ddim", "seed": str(seed)}, timeout=TIMEOUT_S)
    assert answer.status_code == 202, answer.text
    return answer.json()["job"]


def wait_all(url: str, jobs: list[int]) -> list[dict]:
    deadline, states = time.monotonic() + TIMEOUT_S, {}
    while len(states) < len(jobs):
        assert time.monotonic() < deadline, f"{len(states)} of {len(jobs)} finished"
        for job in set(jobs) - set(states):
            state = requests.get(f"{url}/api/jobs/{job}", timeout=TIMEOUT_S).json()
            if state["state"] not in ("queued", "running"):
                states[job] = state
        time.sleep(POLL_S)
    return [states[job] for job in jobs]


def test_concurrent_visitors_all_finish_in_order_with_flat_memory(server):
    if not server.url.startswith("http://127.0.0.1:"):
        pytest.skip("the load test runs against localhost only")
    queue = server.app.state.queue
    memory = []
    for _ in range(ROUNDS):
        start = threading.Barrier(VISITORS)
        with ThreadPoolExecutor(VISITORS) as pool:
            jobs = list(pool.map(lambda s: visit(server.url, s, start), range(VISITORS)))
        states = wait_all(server.url, jobs)
        assert all(s["state"] == "done" and len(s["images"]) == 2 for s in states), states
        finished = [queue.get(job).finished for job in sorted(jobs)]
        assert finished == sorted(finished)  # first taken, first drawn
        for state in states[:2]:  # the images are there to fetch
            assert requests.get(server.url + state["images"][0]["url"], timeout=TIMEOUT_S).content[:4] == b"\x89PNG"
        memory.append(rss_mb())
    print(f"RSS after each round of {VISITORS} visitors (MiB): {memory}")
    assert memory[-1] - memory[1] < GROWTH_LIMIT_MB, memory
