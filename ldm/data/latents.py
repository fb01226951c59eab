"""The latent cache: encode a dataset once with the VAE, then train stage 2 on the stored posteriors.

Layout of ``cache/<name>/``::

    meta.json                      # VAE hash, factor, latent shape, counts, scale_factor, complete flag; the data
                                   # nodes it was built from and, for class folders, the class name → label map
    <split>/shard-00000.safetensors  # posterior `mean`, `std` (N, C, h, w) fp16 [+ `hint` uint8]
    <split>/shard-00000.json         # captions, labels, source paths, and the shard's latent statistics

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
from ldm.data.text_shards import TextContexts
from ldm.io.checkpoints import save_file_atomic

META_FILE = "meta.json"
SHARD_PATTERN = "shard-{:05d}"
CACHE_VERSION = 1
HINT_SCALE = 255.0
SPLITS = ("train", "val")


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
                 shard_size: int = 1024, num_workers: int = 0, progress: bool = True) -> dict:
    """Encode ``dataset`` into shards under ``out_dir`` (resuming finished ones); returns split statistics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(len(dataset) / shard_size)
    device = next(autoencoder.parameters()).device
    bar = tqdm(total=len(dataset), desc=f"caching {out_dir.name}", unit="img", disable=not progress)
    stats = []
    for shard in range(n_shards):
        name = SHARD_PATTERN.format(shard)
        index_path = out_dir / f"{name}.json"
        start, stop = shard * shard_size, min((shard + 1) * shard_size, len(dataset))
        if index_path.is_file() and (out_dir / f"{name}.safetensors").is_file():
            stats.append(json.loads(index_path.read_text())["stats"])  # finished by an earlier run
            bar.update(stop - start)
            continue
        subset = torch.utils.data.Subset(dataset, range(start, stop))
        tensors: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "hint": []}
        records: dict[str, list] = {"caption": [], "label": [], "path": []}
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
        write_json_atomic({**{k: v for k, v in records.items() if v}, "stats": shard_stats}, index_path)
        stats.append(shard_stats)
    bar.close()
    return _combine(stats) | {"items": len(dataset), "shards": n_shards}


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
                progress: bool = True, data_config: Mapping | None = None) -> dict:
    """Encode every split, then write ``meta.json`` with the scale factor of the training split, the class map
    and ``data_config`` (the dataset nodes, so that a cache is never silently reused for other data)."""
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / META_FILE
    if meta_path.is_file():
        previous = json.loads(meta_path.read_text())
        if previous.get("vae", {}).get("hash") != vae_info["hash"]:
            raise CacheError(
                f"{cache_dir} holds latents of VAE {previous.get('vae', {}).get('checkpoint')} "
                f"(hash {previous.get('vae', {}).get('hash')}), not of {vae_info['checkpoint']} "
                f"(hash {vae_info['hash']}); delete it or choose another cache folder"
            )
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = {"version": CACHE_VERSION, "vae": vae_info, "complete": False, "classes": class_map(datasets)}
    if data_config is not None:
        meta["data"] = json.loads(json.dumps(data_config))
    write_json_atomic(meta, meta_path)
    autoencoder.eval()
    splits = {name: encode_split(autoencoder, ds, cache_dir / name, batch_size, shard_size, num_workers, progress)
              for name, ds in datasets.items()}
    sample = LatentDataset(cache_dir, split=next(iter(datasets)), check=False)[0]
    meta.update(
        splits=splits,
        latent_shape=list(sample["mean"].shape),
        image_size=list(next(iter(datasets.values()))[0]["image"].shape[-2:]),
        downsampling_factor=vae_info.get("downsampling_factor"),
        count=sum(s["items"] for s in splits.values()),
        scale_factor=1.0 / splits["train" if "train" in splits else next(iter(splits))]["latent_std"],
        complete=True,
    )
    write_json_atomic(meta, meta_path)
    return meta


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
        self.offsets = [0]
        for shard in self.shards:
            with safe_open(str(shard), framework="pt") as f:
                self.offsets.append(self.offsets[-1] + f.get_slice(next(iter(f.keys()))).get_shape()[0])
        self._handles: dict[int, Any] = {}
        self.text = TextContexts.open(self.shards)  # cached caption embeddings, when the cache holds them

    def __len__(self) -> int:
        return self.offsets[-1]

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
        for key in ("caption", "label", "path"):
            if key in record:
                item[key] = record[key][row]
        if self.text is not None:
            item["context"] = self.text.get(shard, row)  # (T, D)
        return item

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}  # file handles do not cross into worker processes
        return state
