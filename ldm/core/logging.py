"""Logging for the library and its command lines: the library logs, the command lines decide where it goes.

Library modules use ``logging.getLogger(__name__)`` and never print. ``setup_cli_logging`` (called by every
stage and script) sends INFO to stdout as plain lines and warnings / errors to stderr prefixed ``warning:`` /
``error:``, from the rank-zero process only, so a multi-GPU run says things once.
"""

from __future__ import annotations

import logging
import sys

from lightning.fabric.utilities.rank_zero import rank_zero_only

LIBRARY_LOGGER = "ldm"


class RankZeroFilter(logging.Filter):
    """Pass records only in the rank-zero process (Lightning's notion of the global rank)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(rank_zero_only, "rank", 0) == 0


class _StdStreamHandler(logging.StreamHandler):
    """Writes to ``sys.<name>`` as it is when a record is emitted (so redirections made later still apply)."""

    def __init__(self, name: str):
        self._stream_name = name
        super().__init__()

    @property
    def stream(self):  # noqa: D102 - logging's attribute
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, value) -> None:
        pass


class _PrefixFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def setup_cli_logging(level: int = logging.INFO) -> None:
    """Route the ``ldm`` loggers to stdout (INFO) and stderr (WARNING and up), once per process."""
    root = logging.getLogger(LIBRARY_LOGGER)
    if any(getattr(h, "_ldm_cli", False) for h in root.handlers):
        return
    out = _StdStreamHandler("stdout")
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = _StdStreamHandler("stderr")
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler._ldm_cli = True  # type: ignore[attr-defined]
        handler.setFormatter(_PrefixFormatter("%(message)s"))
        handler.addFilter(RankZeroFilter())
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
