"""The page's HTTP API as the serve tests call it: wait for a job to leave the queue and the sampler."""

import time

import requests

TIMEOUT_S = 120.0
POLL_S = 0.02


def wait(server, job: int) -> dict:
    """The job's state once it is neither queued nor running (within TIMEOUT_S)."""
    deadline = time.monotonic() + TIMEOUT_S
    while (state := requests.get(f"{server.url}/api/jobs/{job}", timeout=TIMEOUT_S).json())["state"] in (
            "queued", "running"):
        assert time.monotonic() < deadline, state
        time.sleep(POLL_S)
    return state
