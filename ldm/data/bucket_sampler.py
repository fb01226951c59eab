"""Bucket-homogeneous batches in an order that is a pure function of (seed, epoch, rank, world size).

An epoch's plan: each bucket's items shuffled, cut into global batches of ``batch_size × world_size`` items, all
global batches shuffled together; rank r takes the r-th contiguous part of every global batch. So at each step every
rank draws the same bucket and different items, and a resumed run that skips the first ``n`` global batches of the
epoch sees exactly the items it had not seen. With ``drop_last=False`` a bucket's remainder becomes a smaller last
batch (split so each rank gets at least one item), or, when fewer items than ranks remain, joins the bucket's last
full batch; a bucket with fewer items than ranks is left out (``unplaceable``). With ``drop_last=True`` each bucket's
remainder waits for the next epoch's shuffle (a bucket smaller than one batch is one batch, as the DataModule does).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset, DistributedSampler, Subset, default_collate

EPOCH_SEED_STRIDE = 1_000_003  # seed·stride + epoch: distinct generator seeds for every (seed, epoch)


def bucket_groups(bucket_ids: Sequence[int]) -> dict[int, list[int]]:
    """Bucket → its item indices, in index order; buckets in sorted order."""
    groups: dict[int, list[int]] = {}
    for index, bucket in enumerate(bucket_ids):
        groups.setdefault(int(bucket), []).append(index)
    return dict(sorted(groups.items()))


def _cut(items: list[int], size: int, world_size: int, drop_last: bool) -> list[list[int]]:
    """One bucket's items → global batches of ``size`` (the remainder as the DataModule's drop_last says)."""
    full, rest = divmod(len(items), size)
    batches = [items[i * size:(i + 1) * size] for i in range(full)]
    remainder = items[full * size:]
    if not remainder or (drop_last and batches):  # a bucket smaller than one batch is kept whole
        return batches
    if len(remainder) >= world_size:
        return batches + [remainder]
    if batches:
        batches[-1] = batches[-1] + remainder  # each rank gets batch_size or batch_size + 1
    return batches


def epoch_batches(bucket_ids: Sequence[int], batch_size: int, world_size: int = 1, seed: int = 0, epoch: int = 0,
                  drop_last: bool = False, shuffle: bool = True) -> list[list[int]]:
    """The epoch's global batches (item indices, one bucket each), in the order every rank draws them."""
    generator = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
    batches = []
    for items in bucket_groups(bucket_ids).values():
        if shuffle:
            items = [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]
        batches += _cut(items, batch_size * world_size, world_size, drop_last)
    if shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def rank_share(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous part of a global batch (parts differ in size by at most one)."""
    base, extra = divmod(len(batch), world_size)
    start = rank * base + min(rank, extra)
    return list(batch[start:start + base + (rank < extra)])


def unplaceable(bucket_ids: Sequence[int], world_size: int) -> int:
    """Items of buckets too small to give every rank one item (``drop_last=False`` leaves them out)."""
    return sum(len(items) for items in bucket_groups(bucket_ids).values() if len(items) < world_size)


def dataset_buckets(dataset: Dataset) -> list[int] | None:
    """The bucket of every item of a bucketed dataset (through Subsets), or None for one of a single size."""
    if isinstance(dataset, Subset):
        inner = dataset_buckets(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    ids = getattr(dataset, "bucket_ids", None)
    return None if ids is None else list(ids)


class BucketBatchSampler(DistributedSampler):
    """Yields this rank's batches (lists of indices) of ``epoch_batches``; ``set_epoch`` / ``start_at`` as the
    project's resumable sampler. It is a DistributedSampler so that Lightning leaves its sharding alone."""

    def __init__(self, dataset: Dataset, bucket_ids: Sequence[int], batch_size: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0, drop_last: bool = False, shuffle: bool = True):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.bucket_ids, self.batch_size = list(bucket_ids), batch_size
        self._skip: tuple[int | None, int] = (None, 0)
        self._count = len(epoch_batches(self.bucket_ids, batch_size, world_size, seed, 0, drop_last, shuffle=False))

    def plan(self) -> list[list[int]]:
        """This epoch's global batches."""
        return epoch_batches(self.bucket_ids, self.batch_size, self.num_replicas, self.seed, self.epoch,
                             self.drop_last, self.shuffle)

    def start_at(self, epoch: int, n: int) -> None:
        """Skip the first ``n`` batches of ``epoch`` (once)."""
        self._skip = (epoch, n)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.plan()
        skip_epoch, n = self._skip
        if skip_epoch == self.epoch:
            batches, self._skip = batches[n:], (None, 0)
        return iter([rank_share(batch, self.rank, self.num_replicas) for batch in batches])

    def __len__(self) -> int:
        return self._count  # the same every epoch: only the order changes


class BatchedView(Dataset):
    """A dataset read a batch at a time: ``view[indices]`` is the collated batch of those items."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> dict:
        return default_collate([self.dataset[i] for i in indices])
