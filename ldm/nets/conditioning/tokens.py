"""Caption → token ids with open_clip's shipped BPE vocabulary (works offline), warning on truncation.

Matches ``open_clip.tokenize``: ``[<start>] + bpe(caption) + [<end>]``, cut to the context with the last
id forced to ``<end>``, padded with ``pad_token_id`` (0 as open_clip / SD2; Hugging Face's CLIP
tokenizer, i.e. SD1, pads with the end token 49407).
"""

from __future__ import annotations

import functools
import warnings
from typing import Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer

SPECIAL_TOKENS = 2  # <start_of_text> and <end_of_text>
CACHE_SIZE = 16_384  # distinct captions whose ids are kept (cleared when full)
PREFIX_CHARS = 60  # how much of a caption a warning quotes


@functools.lru_cache(maxsize=1)
def clip_tokenizer() -> SimpleTokenizer:
    """The one shared open_clip BPE tokenizer (building it reads the vocabulary once)."""
    return SimpleTokenizer()


class CaptionTokenizer:
    """Captions → ``(B, max_length)`` LongTensor; warns once per distinct caption that is truncated."""

    def __init__(self, max_length: int, pad_token_id: int = 0):
        if max_length < SPECIAL_TOKENS:
            raise ValueError(f"max_length must be at least {SPECIAL_TOKENS} (start + end tokens), got {max_length}")
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self._ids: dict[str, tuple[int, ...]] = {}
        self._warned: set[str] = set()

    @property
    def vocab_size(self) -> int:
        """Number of distinct token ids the tokenizer emits."""
        return clip_tokenizer().vocab_size

    def __call__(self, captions: Sequence[str] | str) -> torch.Tensor:
        """Tokenise a batch of captions into ``(B, max_length)`` ids on the CPU."""
        if isinstance(captions, str):
            captions = [captions]
        rows = [self._encode(c) for c in captions]
        tokens = torch.full((len(rows), self.max_length), self.pad_token_id, dtype=torch.long)  # (B, L)
        for i, ids in enumerate(rows):
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return tokens

    def _encode(self, caption: str) -> tuple[int, ...]:
        if not isinstance(caption, str):
            raise TypeError(f"captions must be str, got {type(caption).__name__}: {caption!r}")
        ids = self._ids.get(caption)
        if ids is None:
            tok = clip_tokenizer()
            full = [tok.sot_token_id, *tok.encode(caption), tok.eot_token_id]
            if len(full) > self.max_length:
                self._warn_truncated(caption, len(full))
                full = full[: self.max_length - 1] + [tok.eot_token_id]
            if len(self._ids) >= CACHE_SIZE:
                self._ids.clear()
            ids = self._ids[caption] = tuple(full)
        return ids

    def _warn_truncated(self, caption: str, n_tokens: int) -> None:
        if caption in self._warned:
            return
        self._warned.add(caption)
        prefix = caption if len(caption) <= PREFIX_CHARS else caption[:PREFIX_CHARS] + "..."
        warnings.warn(
            f"caption {prefix!r} is {n_tokens} tokens (with start/end) but the text encoder's context is "
            f"{self.max_length} tokens (max_length): it is truncated to the first {self.max_length - SPECIAL_TOKENS} "
            f"text tokens",
            stacklevel=4,
        )
