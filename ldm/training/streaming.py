"""A stage-2 cache as litdata streaming shards (``cache.format: litdata``): build it, check it, and read it.

    cache:
      format: litdata           # folder (default): safetensors shards read whole; litdata: streamed shards
      uri: s3://bucket/cache    # where the shards go: a local folder, s3:// or gs:// (default: <cache.dir>/shards)
      chunk_bytes: 64MB         # litdata chunk size
      num_workers: 2            # optimize's worker processes

``meta.json`` stays in ``cache.dir`` (local), and with ``cache.text_embeddings`` the encoder's files beside it (the
captions' embeddings ride in the shards' items); stage 2's ``LatentDataset`` nodes are read as ``StreamingLatents`` of
the same cache (``StreamingBucketLatents`` when ``cache.data`` has buckets), so a config switches format with this
section alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from torch import nn
from torch.utils.data import Dataset

from ldm.core.config import ConfigError
from ldm.data.latents import CacheError
from ldm.data.shard_check import check_split, is_remote, probe_remote
from ldm.data.streaming import FORMAT, TextEncoder, build_streaming_cache, split_uri, without_text
from ldm.data.text_cache import text_complete

FORMATS = ("folder", FORMAT)
FOLDER_DATASET = "ldm.data.latents.LatentDataset"
STREAMING_DATASET = "ldm.data.streaming.StreamingLatents"
BUCKETED_DATASET = "ldm.data.streaming_buckets.StreamingBucketLatents"
SHARDS_DIR = "shards"


def check_format(section: dict) -> None:
    """``cache.format`` is a known one."""
    if section["format"] not in FORMATS:
        raise ConfigError(f"cache.format: expected one of {', '.join(FORMATS)}, got {section['format']!r}")


def is_streaming(section: dict) -> bool:
    """Whether the cache section asks for litdata shards."""
    return section.get("format") == FORMAT


def shards_uri(section: dict) -> str:
    """Where the shards live: ``cache.uri``, or ``<cache.dir>/shards``."""
    return str(section.get("uri") or Path(section["dir"]) / SHARDS_DIR)


def probe(section: dict) -> None:
    """An unreachable remote URI is a one-line error now (before a run folder or a worker exists)."""
    uri = shards_uri(section)
    if is_remote(uri):
        probe_remote(uri)


def make_streaming(section: dict, vae: nn.Module, info: dict, datasets: Mapping[str, Dataset],
                   text: TextEncoder | None = None) -> dict:
    """Encode the datasets into litdata shards (resuming after the last finished part), each caption by ``text``'s
    frozen encoder too when given (``cache.text_embeddings``); returns meta."""
    return build_streaming_cache(vae, datasets, section["dir"], shards_uri(section), info, section["batch_size"],
                                 section["shard_size"], section["num_workers"], section["data"],
                                 section["chunk_bytes"], text)


def check_streaming(section: dict, meta: dict) -> None:
    """The cache is in the configured format at the configured URI, and every split's shards are whole."""
    found = meta.get("format", "folder")
    if found != section["format"]:
        raise CacheError(f"{section['dir']} is a {found} cache, but cache.format is {section['format']}; delete it, "
                         "or set cache.dir to another folder")
    if not is_streaming(section):
        return
    if meta["uri"] != shards_uri(section):
        raise CacheError(f"{section['dir']}'s shards are at {meta['uri']}, not at cache.uri {shards_uri(section)}")
    if section.get("text_embeddings") and not text_complete(meta):
        raise without_text(section["dir"], meta["uri"])
    if is_bucketed(section) and any("bucket_runs" not in counts for counts in meta["splits"].values()):
        raise CacheError(f"{section['dir']} holds litdata shards without their bucket runs (built before buckets "
                         f"streamed); delete {section['dir']} and its shards at {meta['uri']}, and build it again")
    for split, counts in meta["splits"].items():
        check_split(split_uri(meta["uri"], split), counts["items"])


def is_bucketed(section: dict) -> bool:
    """Whether the cache's datasets sort their images into aspect-ratio buckets (``params.buckets``)."""
    return any(isinstance(((node or {}).get("params") or {}).get("buckets"), dict) for node in section["data"].values())


def read_streamed(cfg: dict) -> None:
    """Stage 2 reads a litdata cache's splits through ``StreamingLatents`` (the folder dataset nodes retargeted), or,
    when the cache is bucketed, through ``StreamingBucketLatents`` (bucket-homogeneous batches, the bucket sampler's
    order: the DataModule's seed, not litdata's shuffle)."""
    bucketed = is_bucketed(cfg["cache"])
    params = (cfg.get("data") or {}).get("params") or {}
    for key in ("train", "val"):
        node = params.get(key)
        if isinstance(node, dict) and node.get("target") == FOLDER_DATASET:
            node["target"] = BUCKETED_DATASET if bucketed else STREAMING_DATASET
            if not bucketed:
                node.setdefault("params", {}).setdefault("seed", cfg.get("seed", 0))
