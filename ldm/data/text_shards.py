"""Reading cached text embeddings: the text shard beside each latent shard, one memory-mapped handle per file
(``ldm.data.text_cache`` writes them). An item carries its caption's ``context`` (T, D); from a cache of a conditioner
with a pooled output too (SDXL's), both under ``text``: ``{"context": (T, D), "pooled": (P,)}``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

from ldm.core.errors import UserError

TEXT_SHARD = "text-{:05d}.safetensors"
UNCOND_FILE = "text_uncond.safetensors"
ENCODER_FILE = "text_encoder.safetensors"
CONTEXT_KEY = "context"
POOLED_KEY = "pooled"  # a conditioner's pooled text embedding (SDXL's last tower), when it has one
TEXT_FIELD = "text"  # the item field holding {context, pooled} of such a cache
CONTEXT_DTYPE = torch.float16


def text_shard_path(shard: Path) -> Path:
    """The text shard beside a latent shard (``shard-00003.safetensors`` → ``text-00003.safetensors``)."""
    return shard.with_name(TEXT_SHARD.format(int(shard.stem.split("-")[-1])))


def text_fields(outputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """An item's fields from its caption's cached outputs, in fp32: ``{"context": (T, D)}``, or with a pooled embedding
    ``{"text": {"context": (T, D), "pooled": (P,)}}``."""
    fields = {key: value.float() for key, value in outputs.items()}
    return {TEXT_FIELD: fields} if POOLED_KEY in fields else fields


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

    def _handle(self, shard: int) -> Any:
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.files[shard]), framework="pt")
        return self._handles[shard]

    def get(self, shard: int, row: int) -> torch.Tensor:
        """The context of item ``row`` of latent shard ``shard`` ``(T, D)``."""
        return self._handle(shard).get_slice(CONTEXT_KEY)[row].float()

    def fields(self, shard: int, row: int) -> dict[str, Any]:
        """What an item of latent shard ``shard`` carries: ``{"context": (T, D)}``, or with a pooled embedding
        ``{"text": {"context": (T, D), "pooled": (P,)}}``; fp32."""
        handle = self._handle(shard)
        keys = [key for key in (CONTEXT_KEY, POOLED_KEY) if key in handle.keys()]
        return text_fields({key: handle.get_slice(key)[row] for key in keys})

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}  # file handles do not cross into worker processes
