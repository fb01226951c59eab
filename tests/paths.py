"""Paths of the source checkout the tests run in."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = REPO_ROOT / "configs" / "tiny"
