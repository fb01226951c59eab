"""A latent cache is its content: its identity is the hash of what it was built from.

``built_from`` gathers that into one plain dict — the VAE's weights hash, the shard size, and per split the dataset
node (its resolution and crop rules: ``size``, ``center_crop``, ``random_flip``, …), its item count and, for a
dataset read from files, the hash of its source list (each file's relative path, size and modification time, its
caption, label and hint file). ``cache_identity`` hashes any such dict, so a cache made with other fields (bucket
resolutions, original sizes and crops, text embeddings) adds them to the dict and stays keyed by its content.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from torch.utils.data import Dataset

IDENTITY_DIGITS = 16


def _digest(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:IDENTITY_DIGITS]


def _stat(path: str | os.PathLike) -> list:
    try:
        stat = Path(path).stat()
    except OSError:
        return [None, None]
    return [stat.st_size, stat.st_mtime_ns]


def source_list(dataset: Dataset) -> list[list] | None:
    """Each item's source of a dataset read from files (its ``records`` under ``root``): relative path, size,
    modification time, caption, label, and the hint file's path, size and time; None for a generated dataset."""
    records, root = getattr(dataset, "records", None), getattr(dataset, "root", None)
    if records is None or root is None:
        return None
    out = []
    for record in records:
        hint = getattr(record, "hint", None)
        out.append([record.rel, *_stat(Path(root) / record.rel), record.caption, record.label,
                    *([hint, *_stat(hint)] if hint else [])])
    return out


def source_paths(dataset: Dataset) -> list[str] | None:
    """The relative path of each item of a dataset read from files, in order (None for a generated one)."""
    records = getattr(dataset, "records", None)
    return None if records is None or getattr(dataset, "root", None) is None else [r.rel for r in records]


def built_from(vae_hash: str, datasets: Mapping[str, Dataset], data_config: Mapping | None, shard_size: int,
               extra: Mapping | None = None) -> dict:
    """What a latent cache is built from, as one plain dict; ``extra``: any other setting that changes what it holds
    (e.g. bucket resolutions), added as top-level fields."""
    splits = {}
    for name, dataset in datasets.items():
        sources = source_list(dataset)
        node = (data_config or {}).get(name)
        splits[name] = {"node": json.loads(json.dumps(node)) if node is not None else None, "items": len(dataset),
                        "sources": _digest(sources) if sources is not None else None,
                        "root": str(Path(dataset.root).resolve()) if sources is not None else None}
    return {"vae": vae_hash, "shard_size": shard_size, "splits": splits, **json.loads(json.dumps(dict(extra or {})))}


def cache_identity(spec: Mapping) -> str:
    """The identity of a cache: the hash of the plain dict of what it is built from."""
    return _digest(spec)


def what_changed(old: Mapping | None, new: Mapping) -> str:
    """In words, the first thing that differs between two ``built_from`` dicts (for the line that says why)."""
    if not old:
        return "the cache records no sources (made before caches kept them)"
    if old.get("vae") != new.get("vae"):
        return f"VAE weights {old.get('vae')} → {new.get('vae')}"
    if old.get("shard_size") != new.get("shard_size"):
        return f"shard size {old.get('shard_size')} → {new.get('shard_size')}"
    for split, now in (new.get("splits") or {}).items():
        then = (old.get("splits") or {}).get(split) or {}
        if then.get("items") != now.get("items"):
            return f"{split}: {then.get('items')} → {now.get('items')} items"
        if then.get("sources") != now.get("sources"):
            return f"{split}: source files, captions or labels changed (same count, {now.get('items')})"
        if then.get("node") != now.get("node"):
            return f"{split}: dataset settings changed"
    extra = sorted(set(old) ^ set(new))
    return f"fields {', '.join(extra)} differ" if extra else "its settings differ"
