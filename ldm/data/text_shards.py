"""Reading cached text embeddings: the text shard beside each latent shard, one memory-mapped handle per file
(``ldm.data.text_cache`` writes them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ldm.core.errors import UserError

TEXT_SHARD = "text-{:05d}.safetensors"
UNCOND_FILE = "text_uncond.safetensors"
ENCODER_FILE = "text_encoder.safetensors"
CONTEXT_KEY = "context"
CONTEXT_DTYPE = torch.float16


def text_shard_path(shard: Path) -> Path:
    """The text shard beside a latent shard (``shard-00003.safetensors`` → ``text-00003.safetensors``)."""
    return shard.with_name(TEXT_SHARD.format(int(shard.stem.split("-")[-1])))


class TextContexts:
    """Reads one split's cached contexts: ``get(shard, row)`` → ``(T, D)`` fp32, one memory-mapped handle per file."""

    def __init__(self, shards: list[Path]):
        self.files = [text_shard_path(p) for p in shards]
        missing = [p for p in self.files if not p.is_file()]
        if missing:
            raise UserError(f"{missing[0]} is missing ({len(missing)} text shard(s) in all): run the caching "
                            "command again to finish the text embeddings")
        self._handles: dict[int, Any] = {}

    @classmethod
    def open(cls, shards: list[Path]) -> "TextContexts | None":
        """The reader when the split has text shards, else None."""
        return cls(shards) if shards and text_shard_path(shards[0]).is_file() else None

    def get(self, shard: int, row: int) -> torch.Tensor:
        """The context of item ``row`` of latent shard ``shard`` ``(T, D)``."""
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.files[shard]), framework="pt")
        return self._handles[shard].get_slice(CONTEXT_KEY)[row].float()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}  # file handles do not cross into worker processes
