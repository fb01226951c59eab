"""Load each VAE once per run: the latent cache's check (or encoding) and the system share the same module."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ldm.inference.loaders import load_autoencoder
from ldm.io.runs import checkpoint_for


class LoadOnce:
    """``load_autoencoder`` with memory: the same checkpoint (run, ``latest`` link or file) is read once."""

    def __init__(self):
        self.loaded: dict[tuple[str, str | None], tuple[nn.Module, dict]] = {}

    def __call__(self, spec: str | os.PathLike, config: str | os.PathLike | None = None) -> tuple[nn.Module, dict]:
        """The frozen VAE and its identity, as ``load_autoencoder`` returns them."""
        where = str(checkpoint_for(spec)) if config is None else str(Path(spec).resolve())
        key = (where, None if config is None else str(Path(config).resolve()))
        if key not in self.loaded:
            self.loaded[key] = load_autoencoder(spec, config)
        return self.loaded[key]
