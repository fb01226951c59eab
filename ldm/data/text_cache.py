"""Cached text embeddings: a frozen text encoder's context for every caption of a latent cache, computed once.

Beside each latent shard ``<split>/shard-00000.*`` the cache holds ``<split>/text-00000.safetensors`` with
``context`` (N, T, D) fp16, the captions' embeddings in the shard's order (and ``pooled`` (N, P) for a conditioner with
a pooled output, SDXL's); the cache folder holds the empty caption's outputs once (``text_uncond.safetensors``, for
CFG dropout) and the encoder's weights (``text_encoder.safetensors``, so a run's checkpoints keep them without
building the encoder). ``meta.json``'s ``text`` entry names the encoder (its config node and weights hash, and the
base file it came from): a cache made with another encoder is refused. Text shards are written atomically, one per
latent shard, so an interrupted run resumes from its finished ones. A litdata cache (``ldm.data.streaming``) keeps
each caption's outputs in its streamed item instead, and the same two files and ``text`` entry beside its meta.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn
from tqdm import tqdm

from ldm.data.latents import META_FILE, CacheError, write_json_atomic
from ldm.data.text_shards import CONTEXT_DTYPE, CONTEXT_KEY, ENCODER_FILE, UNCOND_FILE, text_shard_path
from ldm.io.checkpoints import save_file_atomic


def text_outputs(encoder: nn.Module, captions: list[str]) -> dict[str, torch.Tensor]:
    """What the cache stores of captions: the context ``(N, T, D)``, and the pooled embedding ``(N, P)`` of a
    conditioner that gives one (SDXL's, by its ``text_outputs``)."""
    if hasattr(encoder, "text_outputs"):
        return dict(encoder.text_outputs(captions))
    return {CONTEXT_KEY: encoder(captions)}


@torch.inference_mode()
def encode_captions(encoder: nn.Module, captions: list[str], batch_size: int) -> dict[str, torch.Tensor]:
    """The text outputs of ``captions`` in fp16, in batches: ``{"context": (N, T, D)[, "pooled": (N, P)]}``."""
    parts = [text_outputs(encoder, captions[i:i + batch_size]) for i in range(0, len(captions), batch_size)]
    return {key: torch.cat([p[key].to("cpu", CONTEXT_DTYPE) for p in parts]) for key in parts[0]}


def encode_text_split(encoder: nn.Module, split_dir: Path, batch_size: int = 64, progress: bool = False) -> int:
    """Write the text shard of every latent shard under ``split_dir`` that lacks one; returns the items encoded."""
    encoded = 0
    for index_path in tqdm(sorted(split_dir.glob("shard-*.json")), desc=f"text {split_dir.name}", disable=not progress):
        out = text_shard_path(index_path.with_suffix(".safetensors"))
        if out.is_file():
            continue  # finished by an earlier run
        captions = json.loads(index_path.read_text()).get("caption")
        if captions is None:
            raise no_captions(str(index_path))
        save_file_atomic(encode_captions(encoder, list(captions), batch_size), out)
        encoded += len(captions)
    return encoded


def build_text_cache(encoder: nn.Module, cache_dir: str | Path, encoder_info: dict, batch_size: int = 64,
                     progress: bool = False) -> dict:
    """Encode every split's captions and the empty caption with ``encoder`` (frozen); record it in ``meta.json``.

    ``encoder_info``: ``{"hash": weights hash, "encoder": config node}``; a cache holding another encoder's
    embeddings is refused."""
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / META_FILE
    meta = json.loads(meta_path.read_text())
    check_encoder(meta, encoder_info, str(cache_dir))
    meta["text"] = write_text_files(encoder, cache_dir, encoder_info)
    write_json_atomic(meta, meta_path)
    counts = {split: encode_text_split(encoder, cache_dir / split, batch_size, progress) for split in meta["splits"]}
    meta["text"].update(complete=True, encoded=counts)
    write_json_atomic(meta, meta_path)
    return meta


def write_text_files(encoder: nn.Module, cache_dir: Path, encoder_info: dict) -> dict:
    """Write the empty caption's outputs and the encoder's weights beside ``meta.json``; returns meta's ``text`` entry
    (the encoder's identity and the shapes of its outputs), unfinished."""
    encoder.eval()
    uncond = encode_captions(encoder, [""], 1)  # context (1, T, D)[, pooled (1, P)]
    save_file_atomic(uncond, cache_dir / UNCOND_FILE)
    save_file_atomic(encoder.state_dict(), cache_dir / ENCODER_FILE)
    shapes = {f"{key}_shape": list(value.shape[1:]) for key, value in uncond.items()}
    return {**encoder_info, **shapes, "complete": False}


def no_captions(where: str) -> CacheError:
    """The error for data without captions to embed."""
    return CacheError(f"{where} holds no captions: cached text embeddings need a captioned dataset "
                      "(set cache.text_embeddings: false for labels or unconditional data)")


def check_encoder(meta: dict, encoder_info: dict, where: str) -> None:
    """Refuse a cache whose text embeddings another encoder (another weights hash) made."""
    cached = meta.get("text") or {}
    if cached and cached.get("hash") != encoder_info["hash"]:
        theirs = f" from the base {cached['base']}" if cached.get("base") else ""
        ours = f" from the base {encoder_info['base']}" if encoder_info.get("base") else ""
        raise CacheError(
            f"{where} holds text embeddings of encoder {cached.get('encoder', {}).get('target')}{theirs} (weights hash "
            f"{cached.get('hash')}), not of this config's model.params.cond_stage{ours} (hash {encoder_info['hash']}); "
            f"delete {where}, or set cache.dir to another folder"
        )


def text_complete(meta: dict) -> bool:
    """Whether ``meta.json`` records finished text embeddings."""
    return bool((meta.get("text") or {}).get("complete"))


def load_text_files(cache_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The cached encoder weights (memory-mapped) and the empty caption's outputs: ``{"context": (1, T, D)[, "pooled":
    (1, P)]}``."""
    cache_dir = Path(cache_dir)
    for name in (ENCODER_FILE, UNCOND_FILE):
        if not (cache_dir / name).is_file():
            raise CacheError(f"{cache_dir / name} is missing: run the caching command again with cache.text_embeddings")
    return load_safetensors(str(cache_dir / ENCODER_FILE)), load_safetensors(str(cache_dir / UNCOND_FILE))
