"""Checks of litdata shard locations before anything long starts: a remote URI must answer quickly, and a split's
index and chunks must be whole (a truncated or missing chunk is named, not met half-way through an epoch)."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

from ldm.data.latents import CacheError

REMOTE_SCHEMES = ("s3", "gs")
PROBE_TIMEOUT_S = 5
INDEX_FILE = "index.json"


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names object storage (``s3://``, ``gs://``) rather than a local folder."""
    return "://" in uri


def local_path(uri: str) -> Path:
    """The folder a local URI names (litdata's ``local:`` prefix allowed)."""
    return Path(uri.removeprefix("local:"))


def probe_remote(uri: str) -> None:
    """List one object under ``uri`` with short timeouts; any failure is a one-line CacheError."""
    parsed = urlparse(uri)
    if parsed.scheme not in REMOTE_SCHEMES:
        raise CacheError(f"{uri}: unsupported shard location; use a local folder, s3://bucket/prefix or "
                         "gs://bucket/prefix")
    try:
        if parsed.scheme == "s3":
            import boto3  # deferred: only remote caches need the cloud clients
            from botocore.config import Config

            config = Config(connect_timeout=PROBE_TIMEOUT_S, read_timeout=PROBE_TIMEOUT_S, retries={"max_attempts": 1})
            boto3.client("s3", config=config).list_objects_v2(Bucket=parsed.netloc, Prefix=parsed.path.lstrip("/"),
                                                              MaxKeys=1)
        else:
            from google.cloud import storage  # deferred, as above

            bucket = storage.Client().bucket(parsed.netloc)
            list(bucket.list_blobs(prefix=parsed.path.lstrip("/"), max_results=1, timeout=PROBE_TIMEOUT_S))
    except ImportError as e:
        raise CacheError(f"cannot reach {uri}: {e.name} is not installed (pip install "
                         f"{'boto3' if parsed.scheme == 's3' else 'google-cloud-storage'})") from None
    except Exception as e:  # noqa: BLE001 — every client error (DNS, credentials, no bucket) means the same here
        first = str(e).splitlines()[0] if str(e) else ""
        raise CacheError(f"cannot reach {uri}: {type(e).__name__}: {first} (check the URI, the network and the "
                         "credentials)") from None


def check_split(uri: str, n_items: int) -> None:
    """A split's shards: reachable when remote; when local, the index lists ``n_items`` items and every chunk file
    is there at its recorded size."""
    if is_remote(uri):
        probe_remote(uri)
        return
    folder = local_path(uri)
    index_path = folder / INDEX_FILE
    try:
        chunks = json.loads(index_path.read_text())["chunks"]
    except (OSError, ValueError, KeyError) as e:
        raise CacheError(f"{index_path}: unreadable litdata index ({type(e).__name__}); build the cache "
                         "again") from None
    if sum(c["chunk_size"] for c in chunks) != n_items:
        raise CacheError(f"{index_path} lists {sum(c['chunk_size'] for c in chunks)} items, meta.json {n_items}; "
                         "the shards are incomplete: build the cache again")
    for chunk in chunks:
        path = folder / chunk["filename"]
        size = path.stat().st_size if path.is_file() else None
        if size != chunk["chunk_bytes"]:
            state = "missing" if size is None else f"{size} bytes, the index says {chunk['chunk_bytes']}"
            raise CacheError(f"corrupt latent shard {path} ({state}); delete the cache folder and its shards and "
                             "build it again")
