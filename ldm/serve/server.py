"""Running the app: bind a socket (localhost unless told), serve with uvicorn, or serve in a thread for a check.

``Server(app, host, port)`` binds at once (port 0: a free one) so its URL is known before serving;
``serve_forever`` blocks until Ctrl-C; ``start`` / ``stop`` serve in a background thread (tests, ``--check``).
``check_page`` asks the running server for its page and one toy generation over HTTP, as a browser would.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.parse
import urllib.request

import uvicorn
from fastapi import FastAPI

from ldm.core.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860  # Gradio's, so a browser bookmark carries over
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
START_TIMEOUT_S = 30.0
START_POLL_S = 0.005  # a flag read in this process: uvicorn is up in tens of milliseconds
POLL_S = 0.1  # an HTTP request to the page


class ServerError(UserError):
    """The server could not bind its address or answer its own check."""


class Server:
    """A uvicorn server for ``app`` on a socket bound at construction."""

    def __init__(self, app: FastAPI, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as e:
            self.socket.close()
            raise ServerError(f"cannot listen on {host}:{port} ({e.strerror or e}): give another --port "
                              "(0 picks a free one)") from e
        self.app = app
        self.host, self.port = host, self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The page's address."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Serve until interrupted, then let the running job finish."""
        if self.host not in LOCAL_HOSTS:
            log.warning("listening on %s: anyone who can reach this machine can use the page", self.host)
        log.info("serving the page at %s (Ctrl-C stops)", self.url)
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.app.state.queue.stop()

    def start(self) -> Server:
        """Serve in a background thread; return once the server answers."""
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise ServerError(f"the server at {self.url} did not start")
            time.sleep(START_POLL_S)
        return self

    def stop(self) -> None:
        """Stop serving and end the job queue's worker."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join()
        self.app.state.queue.stop()
        self.socket.close()


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url) as response:  # noqa: S310 - our own server
        return json.loads(response.read())


def check_page(url: str, fields: dict[str, str] | None, timeout_s: float = 600.0) -> dict:
    """Load the page, post one request (form ``fields``; None: none), wait for it; the finished job's state."""
    with urllib.request.urlopen(url + "/") as response:  # noqa: S310 - our own server
        if b"<form" not in response.read():
            raise ServerError(f"{url}/ did not return the page")
    if fields is None:
        return {"state": "done", "images": []}
    data = urllib.parse.urlencode(fields).encode()
    try:
        with urllib.request.urlopen(url + "/api/generate", data=data) as response:  # noqa: S310
            job = json.loads(response.read())["job"]
    except urllib.error.HTTPError as e:
        raise ServerError(f"the server refused its check request: {json.loads(e.read()).get('error')}") from e
    deadline = time.monotonic() + timeout_s
    while (state := _get_json(f"{url}/api/jobs/{job}"))["state"] in ("queued", "running"):
        if time.monotonic() > deadline:
            raise ServerError(f"the check request did not finish in {timeout_s:.0f} s")
        time.sleep(POLL_S)
    if state["state"] != "done":
        raise ServerError(f"the check request failed: {state['error']}")
    return state
