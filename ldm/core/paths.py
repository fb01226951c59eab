"""Where the project's own files are: its configs, in a source checkout or shipped inside an installed package.

``pip install -e .`` (and running from a checkout) reads ``configs/`` beside the package; ``pip install .``
ships the same files as ``ldm/configs`` (setup.py), so ``--cfg configs/ldm/shapes-text.yaml`` and every default
config work from any working directory either way. A path that exists as given always wins.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # ldm/
INSTALLED_CONFIGS = PACKAGE_DIR / "configs"  # a wheel: configs/ shipped inside the package
CHECKOUT_CONFIGS = PACKAGE_DIR.parent / "configs"  # a checkout or an editable install
CONFIGS_PREFIX = "configs"


def config_dir() -> Path:
    """The project's configs folder (installed copy first, else the checkout's)."""
    return INSTALLED_CONFIGS if INSTALLED_CONFIGS.is_dir() else CHECKOUT_CONFIGS


def config_path(path: str | os.PathLike) -> Path:
    """``path`` when it exists; else a ``configs/…`` path looked up in the project's own configs."""
    path = Path(path)
    if path.exists() or path.is_absolute() or not path.parts or path.parts[0] != CONFIGS_PREFIX:
        return path
    return config_dir().joinpath(*path.parts[1:])
