"""The data path at scale, measured: a procedural folder of mixed-aspect JPEGs, the latent cache built from it (folder
and litdata shards, 1 and 2 workers), the streaming loader's throughput, peak resident memory at two dataset sizes,
and shard bytes per image. Each measurement runs in a fresh process (``measure_in_child``), so its peak resident
memory (``ru_maxrss`` of the process and, separately, of its worker processes) is its own.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import queue as queue_module
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import torch
from PIL import Image, ImageDraw

from ldm.bench.timing import count_flops
from ldm.core.config import load_config
from ldm.data.folder import ImageFolderDataset
from ldm.data.latents import LatentDataset, build_cache
from ldm.data.module import DataModule
from ldm.data.streaming import StreamingLatents, build_streaming_cache
from ldm.io.checkpoints import tensors_hash
from ldm.nets.autoencoder.model import AutoencoderKL
from ldm.nets.unet.model import UNetModel

ASPECTS = ((1, 1), (3, 4), (4, 3), (2, 3), (3, 2), (9, 16), (16, 9))  # phones, cameras, screens
SHORT_SIDE = 64  # pixels: small JPEGs, so that 10⁴–10⁵ of them fit this machine's disk and time
JPEG_QUALITY = 90
MIB = 2**20
RSS_INTERVAL_S = 0.05


def write_jpeg_folder(root: Path, n: int, seed: int = 0) -> int:
    """``n`` procedural JPEGs of mixed aspect (gradient + a disc) with captions in metadata.jsonl; reuses the
    images already there. Returns the folder's image bytes."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        rng = np.random.default_rng(seed * 1_000_003 + i)
        a, b = ASPECTS[i % len(ASPECTS)]
        w, h = (SHORT_SIDE * a // min(a, b), SHORT_SIDE * b // min(a, b))
        path = root / f"{i // 1000:04d}" / f"{i:07d}.jpg"
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if not path.is_file():
            path.parent.mkdir(exist_ok=True)
            ramp = np.linspace(0, 1, w)[None, :, None] * rng.integers(0, 256, 3)[None, None, :]  # (1, w, 3)
            image = Image.fromarray(np.broadcast_to(ramp, (h, w, 3)).astype(np.uint8))
            r = int(rng.integers(SHORT_SIDE // 6, SHORT_SIDE // 2))
            x, y = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
            ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=colour)
            image.save(path, quality=JPEG_QUALITY)
        lines.append(json.dumps({"file_name": str(path.relative_to(root)), "text": f"a disc of colour {colour}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return sum(p.stat().st_size for p in root.rglob("*.jpg"))


def tiny_vae(config: str = "configs/tiny/vae.yaml") -> tuple[AutoencoderKL, dict]:
    """The tiny VAE (random weights, seeded) and its identity, as the cache records it."""
    params = load_config(config)["model"]["params"]
    torch.manual_seed(0)
    vae = AutoencoderKL(params["ddconfig"], params["embed_dim"]).eval()
    return vae, {"checkpoint": f"random {config}", "hash": tensors_hash(vae.state_dict()),
                 "downsampling_factor": vae.downsampling_factor}


def build(folder: Path, cache_dir: Path, fmt: str, workers: int, size: int, batch_size: int, shard_size: int) -> dict:
    """Build the cache of ``folder`` at ``size`` px; returns images/s and shard bytes per image."""
    dataset = ImageFolderDataset(str(folder), size=size, captions="metadata")
    vae, info = tiny_vae()
    start = time.perf_counter()
    if fmt == "litdata":
        build_streaming_cache(vae, {"train": dataset}, cache_dir, str(cache_dir / "shards"), info, batch_size,
                              shard_size, workers)
        shards = list((cache_dir / "shards").rglob("chunk-*.bin"))
    else:
        build_cache(vae, {"train": dataset}, cache_dir, info, batch_size, shard_size, workers, progress=False)
        shards = list(cache_dir.rglob("shard-*.*"))
    seconds = time.perf_counter() - start
    return {"images_per_s": len(dataset) / seconds, "seconds": seconds,
            "shard_bytes_per_image": sum(p.stat().st_size for p in shards) / len(dataset)}


def load_epoch(cache_dir: Path, fmt: str, workers: int, batch_size: int) -> dict:
    """One epoch through stage 2's loader (the DataModule's); returns items/s."""
    dataset = StreamingLatents(str(cache_dir)) if fmt == "litdata" else LatentDataset(str(cache_dir))
    loader = DataModule(dataset, batch_size=batch_size, num_workers=workers, val_fraction=0.0).train_dataloader()
    items, start = 0, time.perf_counter()
    for batch in loader:
        items += len(batch["mean"])
    return {"items_per_s": items / (time.perf_counter() - start), "items": items}


class PeakRSS(threading.Thread):
    """Samples the resident memory of this process and, summed, of its worker processes; keeps the peaks (MiB).
    (``ru_maxrss`` would not do: Linux keeps it across the fork + exec that starts a process.)"""

    def __init__(self, interval_s: float = RSS_INTERVAL_S):
        super().__init__(daemon=True)
        self.interval_s, self.main, self.workers, self._halt = interval_s, 0.0, 0.0, threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self._halt.is_set():
            with contextlib.suppress(psutil.Error):  # a worker that ends between listing and reading: next tick
                self.main = max(self.main, me.memory_info().rss / MIB)
                self.workers = max(self.workers, sum(c.memory_info().rss for c in me.children(recursive=True)) / MIB)
            self._halt.wait(self.interval_s)

    def stop(self) -> dict:
        """Stop sampling; the peaks."""
        self._halt.set()
        self.join()
        return {"rss_mib": self.main, "worker_rss_mib": self.workers}


def _child(fn: Callable[..., dict], args: tuple, queue: mp.Queue) -> None:
    torch.set_num_threads(1)
    mp.set_start_method("fork", force=True)  # a fork server's process defaults to forkserver: loader workers fork
    sampler = PeakRSS()
    sampler.start()
    result = fn(*args)
    queue.put({**result, **sampler.stop()})


def measure_in_child(fn: Callable[..., dict], *args) -> dict:
    """``fn(*args)`` in a fresh process, with its peak resident memory (MiB) and its workers' (summed).

    The process is forked from multiprocessing's fork server, a clean interpreter that imported ``fn``'s module once
    (torch, Lightning, …): each measurement starts from the same imports as a spawned process would, without paying
    for them again, and nothing of this process's own state."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([fn.__module__])  # taken by the server's first start (later ones import in the child)
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(fn, args, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not process.is_alive():
                raise RuntimeError(f"the measuring process of {fn.__name__} ended with code "
                                   f"{process.exitcode}") from None
    process.join()
    return result


def sd_step_flops_per_image(config: str = "configs/ldm/folder-text-256.yaml") -> float:
    """Training FLOPs per image (forward + backward) of the GPU config's U-Net, counted on the meta device."""
    params = load_config(config)["model"]["params"]["unet"]["params"]
    with torch.device("meta"):
        unet = UNetModel(**{**params, "use_checkpoint": False})
        side = params["image_size"]
        x = torch.randn(1, params["in_channels"], side, side)  # (1, C, h, w)
        t = torch.zeros(1, dtype=torch.long)
        context = torch.randn(1, 77, params["context_dim"])  # (1, T, D)
    return float(count_flops(lambda: unet(x, t, context=context).sum().backward()))


def needed_items_per_s(flops_per_image: float, gpu_flops: float, utilisation: float) -> float:
    """Images per second one GPU consumes at ``utilisation`` of ``gpu_flops`` (on paper)."""
    return gpu_flops * utilisation / flops_per_image if flops_per_image else math.nan
