"""The latent cache: encode a dataset once with the VAE, then train stage 2 on the stored posteriors.

Layout of ``cache/<name>/``::

    meta.json                      # VAE hash, factor, latent shape, counts, scale_factor, complete flag; the data
                                   # nodes it was built from and, for class folders, the class name → label map
    <split>/shard-00000.safetensors  # posterior `mean`, `std` (N, C, h, w) fp16 [+ `hint` uint8]
    <split>/shard-00000.json         # captions, labels, source paths, and the shard's latent statistics

A bucketed dataset (``ldm.data.buckets``) is written bucket by bucket, so every shard holds one latent shape; its
items also carry their original size and crop top-left, and ``meta.json`` lists the buckets and their counts.

Shards are written atomically, so an interrupted caching run resumes from its finished shards. The
scale factor is 1 / std of z = mean + std·ε over the whole training split (LDM's ``scale_by_std``),
computed exactly from per-shard sums rather than from one batch.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ldm.core.atomic import write_text_atomic
from ldm.core.errors import UserError
from ldm.data.cache_identity import built_from, cache_identity, source_paths, what_changed
from ldm.data.bucket_sampler import bucket_groups
from ldm.data.buckets import size_key
from ldm.data.text_shards import TextContexts
from ldm.io.checkpoints import save_file_atomic

META_FILE = "meta.json"
SHARD_PATTERN = "shard-{:05d}"
CACHE_VERSION = 1
HINT_SCALE = 255.0
SPLITS = ("train", "val")
RECORD_KEYS = ("caption", "label", "path", "original_size", "crop_top_left")  # per-item values in a shard's index


class CacheError(UserError, RuntimeError):
    """A latent cache that is missing, incomplete, or made with another VAE."""


def write_json_atomic(data: Any, path: Path) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))


def read_meta(cache_dir: str | os.PathLike) -> dict:
    """The cache's ``meta.json``; raises CacheError when the cache is absent or unfinished."""
    path = Path(cache_dir) / META_FILE
    if not path.is_file():
        raise CacheError(f"no latent cache at {cache_dir} (missing {META_FILE})")
    meta = json.loads(path.read_text())
    if not meta.get("complete"):
        raise CacheError(f"the latent cache at {cache_dir} is unfinished; run the caching command again to resume it")
    return meta


@torch.inference_mode()
def encode_split(autoencoder: torch.nn.Module, dataset: Dataset, out_dir: Path, batch_size: int = 64,
                 shard_size: int = 1024, num_workers: int = 0, progress: bool = True, identity: str | None = None
                 ) -> dict:
    """Encode ``dataset`` into shards under ``out_dir``; returns split statistics. A finished shard is reused only
    when it belongs to the cache ``identity`` and holds exactly the items expected at its place (``shard_holds``)."""
    paths = source_paths(dataset)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = shard_plan(dataset, shard_size)
    n_shards = len(plan)
    device = next(autoencoder.parameters()).device
    bar = tqdm(total=len(dataset), desc=f"caching {out_dir.name}", unit="img", disable=not progress)
    stats = []
    for shard, indices in enumerate(plan):
        name = SHARD_PATTERN.format(shard)
        index_path = out_dir / f"{name}.json"
        if (out_dir / f"{name}.safetensors").is_file() and shard_holds(
                index_path, identity, len(indices), [paths[i] for i in indices] if paths else None):
            stats.append(json.loads(index_path.read_text())["stats"])  # finished by an earlier run
            bar.update(len(indices))
            continue
        subset = torch.utils.data.Subset(dataset, indices)
        tensors: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "hint": []}
        records: dict[str, list] = {key: [] for key in RECORD_KEYS}
        for batch in DataLoader(subset, batch_size=batch_size, num_workers=num_workers):
            posterior = autoencoder.encode(batch["image"].to(device))
            tensors["mean"].append(posterior.mean.float().cpu())  # (B, C, h, w)
            tensors["std"].append(posterior.std.float().cpu())
            if "hint" in batch:
                tensors["hint"].append((batch["hint"] * HINT_SCALE).round().to(torch.uint8))  # (B, 3, H, W)
            for key in records:
                if key in batch:
                    values = batch[key]
                    records[key] += values.tolist() if torch.is_tensor(values) else list(values)
            bar.update(len(batch["image"]))
        mean, std = torch.cat(tensors["mean"]), torch.cat(tensors["std"])
        arrays = {"mean": mean.half(), "std": std.half()}
        if tensors["hint"]:
            arrays["hint"] = torch.cat(tensors["hint"])
        shard_stats = {"count": mean.numel(), "sum": mean.double().sum().item(),
                       "sum_sq": mean.double().square().sum().item(), "sum_var": std.double().square().sum().item()}
        save_file_atomic(arrays, out_dir / f"{name}.safetensors")
        write_json_atomic({**{k: v for k, v in records.items() if v}, "stats": shard_stats, "identity": identity,
                           "items": len(mean)}, index_path)
        stats.append(shard_stats)
    bar.close()
    return _combine(stats) | {"items": len(dataset), "shards": n_shards}


def shard_holds(index_path: Path, identity: str | None, count: int, paths: list[str] | None) -> bool:
    """Whether a finished shard belongs to the cache ``identity`` and holds ``count`` items (these ``paths``)."""
    if identity is None or not index_path.is_file():
        return False
    index = json.loads(index_path.read_text())
    same_items = index.get("items") == count and (paths is None or index.get("path") == paths)
    return index.get("identity") == identity and same_items


def shard_plan(dataset: Dataset, shard_size: int) -> list[list[int]]:
    """The items of each shard: runs of ``shard_size`` in order, or, for a bucketed dataset, bucket by bucket (one
    latent shape per shard)."""
    bucket_ids = getattr(dataset, "bucket_ids", None)
    groups = bucket_groups(bucket_ids).values() if bucket_ids is not None else [list(range(len(dataset)))]
    return [items[i:i + shard_size] for items in groups for i in range(0, len(items), shard_size)]


def bucket_meta(datasets: Mapping[str, Dataset]) -> dict | None:
    """meta.json's ``buckets``: the config (a plain dict), the sizes (h, w) and each split's count per bucket."""
    configs = {name: ds.bucket_config for name, ds in datasets.items() if getattr(ds, "bucket_config", None)}
    if not configs:
        return None
    config = next(iter(configs.values()))
    counts = {}
    for name, ds in datasets.items():
        per_bucket = {size_key(size): 0 for size in config.sizes}
        for bucket in getattr(ds, "bucket_ids", None) or []:
            per_bucket[size_key(config.sizes[bucket])] += 1
        counts[name] = per_bucket
    return {"config": config.as_dict(), "sizes": [list(s) for s in config.sizes], "counts": counts}


def squarest(sizes: list[list[int]]) -> list[int]:
    """The bucket (h, w) nearest a square (the default sampling size of a bucketed run)."""
    return min(sizes, key=lambda s: (abs(math.log(s[1] / s[0])), -s[0] * s[1]))


def bucket_shapes(sizes: list[list[int]], channels: int, factor: int | None) -> tuple[list[int], list[int]]:
    """A bucketed cache's default latent shape (C, h, w) and image size (H, W): those of its squarest bucket."""
    image_size = squarest(sizes)
    factor = factor or 1
    return [channels, image_size[0] // factor, image_size[1] // factor], image_size


def _combine(stats: list[dict]) -> dict:
    """Mean and variance of z = mean + std·ε from per-shard sums: Var z = E[mean²] + E[std²] − E[mean]²."""
    count = sum(s["count"] for s in stats)
    mu = sum(s["sum"] for s in stats) / count
    var = (sum(s["sum_sq"] for s in stats) + sum(s["sum_var"] for s in stats)) / count - mu**2
    return {"latent_mean": mu, "latent_std": math.sqrt(var)}


def class_map(datasets: Mapping[str, Dataset]) -> dict[str, int]:
    """Class name → label of the first dataset that names its classes (class folders); {} when none does."""
    for dataset in datasets.values():
        names = getattr(dataset, "classes", None)
        if names:
            return {name: i for i, name in enumerate(names)}
    return {}


def build_cache(autoencoder: torch.nn.Module, datasets: Mapping[str, Dataset], cache_dir: str | os.PathLike,
                vae_info: dict, batch_size: int = 64, shard_size: int = 1024, num_workers: int = 0,
                progress: bool = True, data_config: Mapping | None = None, settings: Mapping | None = None) -> dict:
    """Encode every split, then write ``meta.json`` with the scale factor of the training split, the class map
    and ``data_config`` (the dataset nodes, so that a cache is never silently reused for other data); its identity
    covers those, the sources and ``settings`` (``ldm.data.cache_identity``)."""
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / META_FILE
    spec = built_from(vae_info["hash"], datasets, data_config, shard_size, settings)
    identity = cache_identity(spec)
    if meta_path.is_file():
        previous = json.loads(meta_path.read_text())
        if previous.get("vae", {}).get("hash") != vae_info["hash"]:
            raise CacheError(
                f"{cache_dir} holds latents of VAE {previous.get('vae', {}).get('checkpoint')} "
                f"(hash {previous.get('vae', {}).get('hash')}), not of {vae_info['checkpoint']} "
                f"(hash {vae_info['hash']}); delete it or choose another cache folder"
            )
        if previous.get("complete") and previous.get("identity") != identity:
            raise CacheError(
                f"{cache_dir} holds a finished cache of other sources ({what_changed(previous.get('built_from'), spec)}"
                "); choose another cache folder (--out / cache.dir) or delete it")
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = {"version": CACHE_VERSION, "vae": vae_info, "complete": False, "classes": class_map(datasets),
            "identity": identity, "built_from": spec}
    if data_config is not None:
        meta["data"] = json.loads(json.dumps(data_config))
    write_json_atomic(meta, meta_path)
    autoencoder.eval()
    splits = {name: encode_split(autoencoder, ds, cache_dir / name, batch_size, shard_size, num_workers, progress,
                                 identity) for name, ds in datasets.items()}
    for name, ds in datasets.items():
        _remove_extra_shards(cache_dir / name, len(shard_plan(ds, shard_size)))
    sample = LatentDataset(cache_dir, split=next(iter(datasets)), check=False)[0]
    latent_shape = list(sample["mean"].shape)
    image_size = list(next(iter(datasets.values()))[0]["image"].shape[-2:])
    buckets = bucket_meta(datasets)
    if buckets is not None:  # the default size of a bucketed cache: its squarest bucket
        latent_shape, image_size = bucket_shapes(buckets["sizes"], latent_shape[0], vae_info.get("downsampling_factor"))
        meta["buckets"] = buckets
    meta.update(
        splits=splits,
        latent_shape=latent_shape,
        image_size=image_size,
        downsampling_factor=vae_info.get("downsampling_factor"),
        count=sum(s["items"] for s in splits.values()),
        scale_factor=1.0 / splits["train" if "train" in splits else next(iter(splits))]["latent_std"],
        complete=True,
    )
    write_json_atomic(meta, meta_path)
    return meta


def _remove_extra_shards(split_dir: Path, n_shards: int) -> None:
    """Delete shards past the last one a split needs (left by an earlier, larger build in the same folder)."""
    for path in split_dir.glob("shard-*.*"):
        if int(path.stem.split("-")[1]) >= n_shards:
            path.unlink()


def check_counts(cache_dir: str | os.PathLike, meta: Mapping) -> None:
    """A finished cache's shards must hold the item count its ``meta.json`` records, split by split."""
    for split, counts in (meta.get("splits") or {}).items():
        found = len(LatentDataset(str(cache_dir), split, check=False))
        if found != counts.get("items"):
            raise CacheError(f"the latent cache {cache_dir} is damaged: meta.json records {counts.get('items')} "
                             f"{split} items, its shards hold {found}; delete it and build it again")


class LatentDataset(Dataset):
    """Items of one cache split: its tensors as fp32 — a latent cache's posterior ``mean`` and ``std`` (C, h, w), a
    reflow cache's ``noise`` and ``latent`` — the hint in [0, 1] when stored, caption, label, path, and the caption's
    cached ``context`` (T, D) when the cache holds text embeddings (``ldm.data.text_cache``)."""

    def __init__(self, cache_dir: str, split: str = "train", check: bool = True):
        self.cache_dir = Path(cache_dir)
        self.meta = read_meta(cache_dir) if check else {}
        split_dir = self.cache_dir / split
        self.shards = sorted(split_dir.glob("shard-*.safetensors"))
        if not self.shards:
            raise CacheError(f"latent cache {cache_dir} has no shards for split {split!r}")
        self.records = [json.loads(p.with_suffix(".json").read_text()) for p in self.shards]
        self.offsets, shapes = [0], []
        for shard in self.shards:
            with safe_open(str(shard), framework="pt") as f:
                key = "mean" if "mean" in f.keys() else next(iter(f.keys()))
                shape = f.get_slice(key).get_shape()  # (N, C, h, w)
                self.offsets.append(self.offsets[-1] + shape[0])
                shapes.append(tuple(shape[1:]))
        self._handles: dict[int, Any] = {}
        self.bucket_ids = self._bucket_ids(shapes)
        self.text = TextContexts.open(self.shards)  # cached caption embeddings, when the cache holds them

    def __len__(self) -> int:
        return self.offsets[-1]

    def _bucket_ids(self, shapes: list[tuple]) -> list[int] | None:
        """Each item's bucket (the index of its shard's latent shape) when the split holds several shapes or the
        cache is bucketed; None otherwise (one size: plain batches)."""
        distinct = sorted(set(shapes))
        if len(distinct) < 2 and not self.meta.get("buckets"):
            return None
        ids = []
        for shard, shape in enumerate(shapes):
            ids += [distinct.index(shape)] * (self.offsets[shard + 1] - self.offsets[shard])
        return ids

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = bisect.bisect_right(self.offsets, index) - 1
        return shard, index - self.offsets[shard]

    def __getitem__(self, index: int) -> dict:
        shard, row = self._locate(index)
        if shard not in self._handles:  # one memory-mapped handle per shard and worker
            self._handles[shard] = safe_open(str(self.shards[shard]), framework="pt")
        handle = self._handles[shard]
        item = {key: handle.get_slice(key)[row].float() for key in handle.keys() if key != "hint"}
        if "hint" in handle.keys():
            item["hint"] = handle.get_slice("hint")[row].float() / HINT_SCALE
        record = self.records[shard]
        for key in RECORD_KEYS:
            if key in record:
                value = record[key][row]
                item[key] = torch.tensor(value) if isinstance(value, list) else value  # sizes: (2,) tensors
        if self.text is not None:
            item.update(self.text.fields(shard, row))  # context (T, D), or text: {context, pooled (P,)}
        return item

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}  # file handles do not cross into worker processes
        return state
