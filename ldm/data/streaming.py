"""The latent cache as litdata streaming shards (``cache.format: litdata``), for data past one disk and many GPUs.

Layout: the cache folder (local) keeps ``meta.json`` (as the folder cache's, plus ``format``, ``uri`` and the
parts done) and the per-batch latent statistics; the shards live at ``uri`` (a local folder, ``s3://…`` or
``gs://…``), one litdata dataset per split (``<uri>/<split>/index.json`` + ``chunk-*.bin``). An item holds
``index`` (its place in the source dataset), the posterior ``mean`` and ``std`` (C, h, w) fp16 — any shape, so
buckets stream too —, the hint as uint8, whatever the source gives of caption, label, path, ``original_size``
and ``crop_top_left``, and with cached text embeddings (a frozen text encoder given to the build) its caption's
``context`` (T, D) fp16 (and ``pooled`` (P,) for SDXL's conditioner); the empty caption's outputs and the encoder's
weights are written once beside meta.json, as the folder cache keeps them (``ldm.data.text_cache``).

Writing goes part by part through litdata's ``optimize`` (its workers in parallel): the folder cache's shard plan,
``shard_size`` items each, bucket by bucket for a bucketed dataset. Each part is appended to the split's dataset and
recorded in ``meta.json`` once it is complete: an interrupted build resumes at the first unfinished part, never
re-encoding a finished one. ``StreamingLatents`` reads a split with litdata's ``StreamingDataset`` (ranks and
workers split the data; its loader's state rides in Lightning checkpoints); a bucketed split is read by
``ldm.data.streaming_buckets.StreamingBucketLatents`` instead (bucket-homogeneous batches).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import litdata
import torch
from litdata import StreamingDataset
from torch import nn
from torch.utils.data import Dataset, default_collate

from ldm.data.latents import CACHE_VERSION, HINT_SCALE, META_FILE, RECORD_KEYS, CacheError, _combine, bucket_meta
from ldm.data.latents import bucket_shapes, class_map, read_meta, shard_plan, write_json_atomic
from ldm.data.shard_check import INDEX_FILE, check_split, is_remote, local_path, probe_remote
from ldm.data.text_cache import check_encoder, encode_captions, no_captions, write_text_files
from ldm.data.text_shards import CONTEXT_KEY, ENCODER_FILE, POOLED_KEY, UNCOND_FILE, text_fields

FORMAT = "litdata"
STATS_DIR = "litdata-stats"
DEFAULT_CHUNK_BYTES = "64MB"  # litdata's advice: chunks of tens of MB stream well from object storage
DEFAULT_MAX_CACHE = "50GB"  # chunks of remote shards kept on local disk per node
PASSED_THROUGH = RECORD_KEYS  # the source fields an item keeps (caption, label, path, original size, crop)
TEXT_KEYS = (CONTEXT_KEY, POOLED_KEY)  # an item's cached text outputs, as encode_captions names them
TextEncoder = tuple[nn.Module, dict]  # a frozen text encoder and its identity {"hash", "encoder"[, "base"]}


def split_uri(uri: str, split: str) -> str:
    """Where a split's shards live under the cache's ``uri``."""
    return f"{uri.rstrip('/')}/{split}"


class PartOf(Dataset):
    """The items ``indices`` of ``dataset``, read by their index in it: what one part's litdata workers receive, so a
    dataset that can give a copy of some items alone (``only``, the image folder's) sends those, not its listing."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.cut = hasattr(dataset, "only")  # else the whole dataset travels, read by its own indices
        self.dataset = dataset.only(indices) if self.cut else dataset
        self.position = {index: k for k, index in enumerate(indices)}  # index in dataset → position in the part

    def __len__(self) -> int:
        return len(self.position)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[self.position[index] if self.cut else index]


class EncodeBatches:
    """``optimize``'s function: a batch of source indices → one item per image, encoded by the VAE in the worker (its
    caption by ``text_encoder`` too, when given); writes the batch's latent statistics (for the scale factor) beside
    the cache's meta.json."""

    def __init__(self, autoencoder: torch.nn.Module, dataset: Dataset, stats_dir: Path,
                 text_encoder: nn.Module | None = None):
        self.autoencoder, self.dataset, self.stats_dir = autoencoder, dataset, stats_dir
        self.text_encoder = text_encoder
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @torch.inference_mode()
    def __call__(self, indices: list[int]) -> Iterator[dict]:
        """Yield the items of ``indices``, encoding images of one shape together (buckets)."""
        vae = self.autoencoder.to(self.device).eval()
        by_shape: dict[tuple, list[tuple[int, dict]]] = defaultdict(list)
        for i in indices:
            source = self.dataset[i]
            by_shape[tuple(source["image"].shape)].append((i, source))
        text = self.encode_text(by_shape)
        stats = []
        for group in by_shape.values():
            batch = default_collate([source for _, source in group])
            posterior = vae.encode(batch["image"].to(self.device))
            mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()  # (B, C, h, w)
            stats.append({"count": mean.numel(), "sum": mean.double().sum().item(),
                          "sum_sq": mean.double().square().sum().item(), "sum_var": std.double().square().sum().item(),
                          "latent_shape": list(mean.shape[1:]), "image_size": list(batch["image"].shape[-2:])})
            for j, (index, source) in enumerate(group):
                yield stream_item(index, mean[j], std[j], source, text.get(index))
        write_json_atomic(stats, self.stats_dir / f"{indices[0]:010d}.json")

    def encode_text(self, by_shape: Mapping[tuple, list[tuple[int, dict]]]) -> dict[int, dict[str, torch.Tensor]]:
        """Each source index's cached text outputs (fp16, one encoder batch for the whole batch), or none without a
        text encoder."""
        if self.text_encoder is None:
            return {}
        sources = [pair for group in by_shape.values() for pair in group]
        if any("caption" not in source for _, source in sources):
            raise no_captions(f"{type(self.dataset).__name__} (cache.data)")
        encoder = self.text_encoder.to(self.device).eval()
        outputs = encode_captions(encoder, [source["caption"] for _, source in sources], len(sources))
        return {index: {key: value[row] for key, value in outputs.items()} for row, (index, _) in enumerate(sources)}


def stream_item(index: int, mean: torch.Tensor, std: torch.Tensor, source: Mapping[str, Any],
                text: Mapping[str, torch.Tensor] | None = None) -> dict:
    """One streamed item: fp16 posterior, uint8 hint, the source's caption / label / path / size / crop, and the
    caption's cached text outputs (fp16 ``context`` (T, D)[, ``pooled`` (P,)]) when given."""
    item = {"index": index, "mean": mean.half(), "std": std.half(), **(text or {})}
    if "hint" in source:
        item["hint"] = (source["hint"] * HINT_SCALE).round().to(torch.uint8)  # (3, H, W)
    for key in PASSED_THROUGH:
        if key in source:
            value = source[key]
            item[key] = value.tolist() if torch.is_tensor(value) else value
    return item


def build_streaming_cache(autoencoder: torch.nn.Module, datasets: Mapping[str, Dataset], cache_dir: str | os.PathLike,
                          uri: str, vae_info: dict, batch_size: int = 64, shard_size: int = 4096, num_workers: int = 1,
                          data_config: Mapping | None = None, chunk_bytes: str = DEFAULT_CHUNK_BYTES,
                          text: TextEncoder | None = None) -> dict:
    """Encode every split into litdata shards at ``uri`` part by part (resuming after the last finished part); with
    ``text`` (a frozen encoder and its identity) each item keeps its caption's embeddings too."""
    if is_remote(uri):
        probe_remote(uri)  # one line now, not a stack trace from a worker later
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / META_FILE
    previous = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if previous and (previous.get("vae", {}).get("hash") != vae_info["hash"] or previous.get("uri") != uri):
        raise CacheError(f"{cache_dir} holds another cache (VAE hash {previous.get('vae', {}).get('hash')}, shards at "
                         f"{previous.get('uri')}), not this one (VAE hash {vae_info['hash']}, shards at {uri}); delete "
                         "it or choose another cache folder")
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = {"version": CACHE_VERSION, "vae": vae_info, "format": FORMAT, "uri": uri, "complete": False,
            "classes": class_map(datasets), "parts": previous.get("parts", {}), "chunks": previous.get("chunks", {})}
    if text is not None:
        check_captions(datasets)
    text_entry = start_text(previous, text, cache_dir)
    if text_entry is not None:
        meta["text"] = text_entry
    if data_config is not None:
        meta["data"] = json.loads(json.dumps(data_config))
    write_json_atomic(meta, meta_path)
    text_encoder, encoded = text[0] if text else None, {}  # items encoded by this run, per split
    splits = {}
    for split, dataset in datasets.items():
        stats_dir = cache_dir / STATS_DIR / split
        stats_dir.mkdir(parents=True, exist_ok=True)
        plan = shard_plan(dataset, shard_size)  # parts in stream order (a bucketed dataset's: one bucket each)
        n_parts = len(plan)
        if meta["parts"].get(split, 0) < n_parts:
            trim_index(split_uri(uri, split), meta["chunks"].get(split, 0))
        for part in range(meta["parts"].get(split, 0), n_parts):
            items = plan[part]
            batches = [items[s:s + batch_size] for s in range(0, len(items), batch_size)]
            source = PartOf(dataset, items)  # the part's items alone travel to its workers
            with optimize_start_method() as start_method:
                litdata.optimize(fn=EncodeBatches(autoencoder, source, stats_dir, text_encoder), inputs=batches,
                                 output_dir=split_uri(uri, split), chunk_bytes=chunk_bytes,
                                 num_workers=max(num_workers, 1), mode="append" if part else "overwrite",
                                 verbose=False, start_method=start_method)
            encoded[split] = encoded.get(split, 0) + len(items)
            meta["parts"][split] = part + 1
            meta["chunks"][split] = count_chunks(split_uri(uri, split))
            write_json_atomic(meta, meta_path)
        splits[split] = split_stats(stats_dir, len(dataset)) | {"items": len(dataset), "shards": n_parts}
        if getattr(dataset, "bucket_ids", None) is not None:
            splits[split]["bucket_runs"] = bucket_runs(dataset.bucket_ids, plan)
    first = splits["train" if "train" in splits else next(iter(splits))]
    latent_shape, image_size = first["latent_shape"], first["image_size"]
    buckets = bucket_meta(datasets)
    if buckets is not None:  # as the folder cache: the buckets, and the squarest one as the default size
        meta["buckets"] = buckets
        latent_shape, image_size = bucket_shapes(buckets["sizes"], latent_shape[0], vae_info.get("downsampling_factor"))
    meta.update(splits={k: {x: v for x, v in s.items() if x not in ("latent_shape", "image_size")}
                        for k, s in splits.items()},
                latent_shape=latent_shape, image_size=image_size,
                downsampling_factor=vae_info.get("downsampling_factor"),
                count=sum(s["items"] for s in splits.values()), scale_factor=1.0 / first["latent_std"], complete=True)
    if text is not None:
        meta["text"].update(complete=True, encoded={split: encoded.get(split, 0) for split in splits})
    write_json_atomic(meta, meta_path)
    return meta


@contextmanager
def optimize_start_method() -> Iterator[str | None]:
    """How ``optimize`` starts a part's workers: forked (nothing imported again, milliseconds a part instead of seconds)
    where that is safe — the platform forks, CUDA is not initialised in this process, and torch runs one thread here
    (a forked child entering a multi-threaded OpenMP region hangs) —, else litdata's default (spawn). litdata sets the
    process-wide start method; the one before is put back afterwards, so later loaders start their workers as before."""
    before = multiprocessing.get_start_method(allow_none=True)
    safe = "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized()
    try:
        yield "fork" if safe and torch.get_num_threads() == 1 else None
    finally:
        multiprocessing.set_start_method(before, force=True)


def check_captions(datasets: Mapping[str, Dataset]) -> None:
    """Text embeddings need captions: a split whose first item has none is refused before anything is encoded."""
    for split, dataset in datasets.items():
        if len(dataset) and "caption" not in dataset[0]:
            raise no_captions(f"cache.data.{split} ({type(dataset).__name__})")


def start_text(previous: dict, text: TextEncoder | None, cache_dir: Path) -> dict | None:
    """meta.json's ``text`` entry for this build: the encoder's identity, its empty caption's outputs and weights
    written beside meta.json. A resumed build is refused when another encoder, or none, encoded its finished parts
    (an item cannot take its embeddings afterwards); a finished cache keeps its entry when rebuilt without one."""
    cached = previous.get("text")
    started = any(previous.get("parts", {}).values())
    if text is None:
        if cached and started and not previous.get("complete"):
            raise CacheError(f"{cache_dir} holds a partial litdata cache with text embeddings: set "
                             "cache.text_embeddings: true to finish it, or delete it (and its shards) to start again")
        return cached
    check_encoder(previous, text[1], str(cache_dir))
    if started and not cached:
        raise without_text(cache_dir, previous.get("uri"))
    if cached and all((cache_dir / name).is_file() for name in (UNCOND_FILE, ENCODER_FILE)):
        return cached  # the same encoder's files, written by the build this one resumes
    return write_text_files(text[0], cache_dir, text[1])


def without_text(cache_dir: str | os.PathLike, uri: str | None) -> CacheError:
    """The error for a litdata cache built without the text embeddings a config asks for."""
    return CacheError(f"{cache_dir} holds litdata shards without text embeddings (their items cannot take them "
                      f"afterwards): delete {cache_dir} and its shards at {uri} to build it again with them, or set "
                      "cache.text_embeddings: false")


def bucket_runs(bucket_ids: list[int], plan: list[list[int]]) -> list[list[int]]:
    """[bucket, items] of every part in stream order: each part is appended whole after the ones before it, so the
    streamed item ``i`` lies in the run that covers ``i`` (``StreamingBucketLatents`` expands them)."""
    return [[int(bucket_ids[part[0]]), len(part)] for part in plan]


def count_chunks(uri: str) -> int | None:
    """How many chunks a split's litdata index lists (None for remote shards, whose index is not read here)."""
    return None if is_remote(uri) else len(json.loads((local_path(uri) / INDEX_FILE).read_text())["chunks"])


def trim_index(uri: str, n_chunks: int | None) -> None:
    """Keep the first ``n_chunks`` chunks of a local split's index (those of its finished parts): a build killed
    after litdata wrote a part's index but before meta.json recorded the part appends it again, not twice."""
    index_path = local_path(uri) / INDEX_FILE
    if n_chunks is None or is_remote(uri) or not index_path.is_file():
        return  # remote: litdata writes the index only when a part completes
    index = json.loads(index_path.read_text())
    if len(index["chunks"]) > n_chunks:
        write_json_atomic({**index, "chunks": index["chunks"][:n_chunks]}, index_path)


def split_stats(stats_dir: Path, n_items: int) -> dict:
    """Latent mean and std of a split from its batches' statistics, with the first batch's latent and image shape."""
    batches = [json.loads(p.read_text()) for p in sorted(stats_dir.glob("*.json")) if int(p.stem) < n_items]
    groups = [g for batch in batches for g in batch]
    if not groups:
        raise CacheError(f"{stats_dir} holds no latent statistics: delete the cache folder and build it again")
    return _combine(groups) | {"latent_shape": groups[0]["latent_shape"], "image_size": groups[0]["image_size"]}


def decode_item(item: dict) -> dict:
    """A streamed item as the folder cache gives it: fp32 posterior, hint in [0, 1], sizes as (2,) tensors, cached
    text outputs as ``context`` (T, D), or SDXL's as ``text: {context, pooled}`` (fp32)."""
    item["mean"], item["std"] = item["mean"].float(), item["std"].float()
    item.update(text_fields({key: item.pop(key) for key in TEXT_KEYS if key in item}))
    if "hint" in item:
        item["hint"] = item["hint"].float() / HINT_SCALE
    for key, value in item.items():
        if isinstance(value, list):
            item[key] = torch.tensor(value)  # original_size, crop_top_left
    return item


class StreamingLatents(StreamingDataset):
    """One split of a litdata latent cache, streamed: shuffled per epoch from ``seed`` (validation in order), split
    over ranks and workers by litdata; its shards are checked (index and chunk sizes) before anything reads them."""

    def __init__(self, cache_dir: str, split: str = "train", shuffle: bool | None = None, seed: int = 0,
                 local_cache: str | None = None, max_cache_size: str = DEFAULT_MAX_CACHE):
        self.meta, uri = open_split(cache_dir, split)
        if self.meta.get("buckets"):
            raise CacheError(f"{cache_dir} holds aspect-ratio buckets: read it with "
                             "ldm.data.streaming_buckets.StreamingBucketLatents (bucket-homogeneous batches)")
        super().__init__(uri, cache_dir=local_cache, shuffle=split == "train" if shuffle is None else shuffle,
                         seed=seed, max_cache_size=max_cache_size, transform=decode_item)


def open_split(cache_dir: str, split: str) -> tuple[dict, str]:
    """A litdata cache's meta.json and the URI of ``split``'s shards, checked (index and chunk sizes) first."""
    meta = read_meta(cache_dir)
    if meta.get("format") != FORMAT:
        raise CacheError(f"{cache_dir} is a folder latent cache, not litdata shards: read it with "
                         "ldm.data.latents.LatentDataset (or rebuild it with cache.format: litdata)")
    if split not in meta["splits"]:
        raise CacheError(f"the litdata cache {cache_dir} has no split {split!r} (it has {', '.join(meta['splits'])})")
    uri = split_uri(meta["uri"], split)
    check_split(uri, meta["splits"][split]["items"])
    return meta, uri
