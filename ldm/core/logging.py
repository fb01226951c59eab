"""Logging for the library and its command lines: the library logs, the command lines decide where it goes.

Library modules use ``logging.getLogger(__name__)`` and never print. ``setup_cli_logging`` (called by every
stage and script) sends INFO to stdout as plain lines and warnings / errors to stderr prefixed ``warning:`` /
``error:``, from the rank-zero process only, so a multi-GPU run says things once. It also silences what a user
cannot act on (``KNOWN_NOISE``): each entry is one message of one library, matched exactly, with the reason it is
harmless here; every other warning still shows.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

from lightning.fabric.utilities.rank_zero import rank_zero_only

LIBRARY_LOGGER = "ldm"
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
# (message pattern, why it is noise here). Warnings are matched at the start of their message.
KNOWN_NOISE: tuple[tuple[str, str], ...] = (
    (r"Precision \S+ is not supported by the model summary",
     "only the summary's size estimate is affected; training runs in that precision"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "inside Lightning's pytree helper, not this code"),
    (r"Using ModelCheckpoint with manual optimization",
     "the VAE's two optimisers step manually; its checkpoints hold the state after the step, as intended"),
    (r"Found \d+ module\(s\) in eval mode at the start of training",
     "frozen parts (the VAE, a frozen text encoder, LPIPS) stay in eval mode on purpose"),
    (r"The number of training batches \(\d+\) is smaller than the logging interval",
     "step-based runs log every log_every_n_steps steps across epochs, so metrics are logged"),
)
LIGHTNING_TIPS = re.compile(r"^\W*Tip:")  # Lightning's advertising banners (litlogger, litmodels)


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
        """Ignored: logging's StreamHandler assigns a stream once, but this handler looks it up on ``sys`` at every
        write (pytest and notebooks swap sys.stdout / sys.stderr)."""


class _PrefixFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


class _DropTips(logging.Filter):
    """Drop Lightning's "💡 Tip: install …" banners."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not LIGHTNING_TIPS.match(record.getMessage())


def silence_known_noise() -> None:
    """Ignore the warnings of ``KNOWN_NOISE`` and Lightning's tip banners; nothing else."""
    for pattern, _why in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


def setup_cli_logging(level: int = logging.INFO) -> None:
    """Route the ``ldm`` loggers to stdout (INFO) and stderr (WARNING and up), once per process; silence known noise."""
    silence_known_noise()
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
