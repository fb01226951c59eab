"""A bucketed litdata latent cache read in bucket-homogeneous batches: the folder cache's guarantees, streamed.

litdata's own loader shuffles a whole split and cuts it into batches of whatever shapes come along; buckets need
batches of one latent shape. So a bucketed split is read here as a map-style dataset: item ``i`` comes from
litdata's ``StreamingDataset[i]`` (random access: a local chunk read in place; a remote one by two byte-range reads
of that item, or from litdata's local chunk cache), and each item's bucket comes from ``meta.json``'s
``bucket_runs`` (the streaming build appends one bucket's part at a time, so runs of one bucket tile the split). The
DataModule then draws it exactly as a bucketed folder cache, through ``ldm.data.bucket_sampler``: one batch order,
a pure function of (seed, epoch, rank, world size), that every rank shares and a resumed run continues.
"""

from __future__ import annotations

from typing import Any

from litdata import StreamingDataset
from torch.utils.data import Dataset

from ldm.data.latents import CacheError
from ldm.data.streaming import DEFAULT_MAX_CACHE, decode_item, open_split


class StreamingBucketLatents(Dataset):
    """One split of a bucketed litdata cache, item by item; ``bucket_ids`` gives the DataModule its buckets."""

    def __init__(self, cache_dir: str, split: str = "train", local_cache: str | None = None,
                 max_cache_size: str = DEFAULT_MAX_CACHE):
        self.meta, self.uri = open_split(cache_dir, split)
        runs = self.meta["splits"][split].get("bucket_runs")
        if runs is None:
            raise CacheError(f"the litdata cache {cache_dir} records no buckets for {split!r}: read a cache built "
                             "without buckets with ldm.data.streaming.StreamingLatents; rebuild one built before "
                             "buckets streamed")
        self.bucket_ids = split_buckets(runs, self.meta["buckets"]["sizes"])
        if len(self.bucket_ids) != self.meta["splits"][split]["items"]:
            raise CacheError(f"the litdata cache {cache_dir} is damaged: its bucket runs cover {len(self.bucket_ids)} "
                             f"{split} items, meta.json records {self.meta['splits'][split]['items']}; build it again")
        self.local_cache, self.max_cache_size = local_cache, max_cache_size
        self._stream: StreamingDataset | None = None  # opened in the process (or loader worker) that reads

    def __len__(self) -> int:
        return len(self.bucket_ids)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self._stream is None:
            self._stream = StreamingDataset(self.uri, cache_dir=self.local_cache, max_cache_size=self.max_cache_size,
                                            transform=decode_item)
        return self._stream[index]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_stream"] = None  # litdata's reader (threads, open chunks) does not cross into worker processes
        return state


def split_buckets(runs: list[list[int]], sizes: list[list[int]]) -> list[int]:
    """Each item's bucket from the split's [bucket, items] runs, numbered as the folder cache numbers them (by rank
    among the split's sizes, smallest first), so both formats give the bucket sampler the same batches."""
    present = sorted({bucket for bucket, _ in runs}, key=lambda bucket: sizes[bucket])
    rank = {bucket: i for i, bucket in enumerate(present)}
    return [rank[bucket] for bucket, count in runs for _ in range(count)]
