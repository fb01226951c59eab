"""LightningDataModule over datasets the config loader has already built (`train`, optional `val`)."""

from __future__ import annotations

import warnings
from typing import Iterator

import lightning as L
import torch
from litdata import StreamingDataLoader, StreamingDataset
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, random_split

from ldm.data.bucket_sampler import BatchedView, BucketBatchSampler, dataset_buckets, unplaceable


class ResumableRandomSampler(DistributedSampler):
    """A seeded permutation per epoch (seed + epoch) that can start part-way through one, split over the ranks.

    Lightning calls ``set_epoch`` at each epoch start; ``start_at(epoch, n)`` makes that epoch's next
    pass skip its first ``n`` indices (of all ranks together), so a resumed run sees exactly the items it had not
    seen yet. ``shard(world_size, rank)`` gives rank r the permutation's items r, r + W, … (padded, as a
    DistributedSampler pads, to a multiple of W). It is a DistributedSampler so that Lightning does not wrap it:
    Lightning's wrapper sizes the epoch by ``len(sampler)`` but reads the shortened resumed pass (IndexError).
    """

    def __init__(self, length: int, seed: int = 0):
        super().__init__(range(length), num_replicas=1, rank=0, shuffle=True, seed=seed)
        self.length, self._skip = length, (None, 0)

    def shard(self, world_size: int, rank: int) -> None:
        """Draw rank ``rank``'s share of every epoch among ``world_size`` ranks."""
        self.num_replicas, self.rank = world_size, rank

    def start_at(self, epoch: int, n: int) -> None:
        """Skip the first ``n`` indices of ``epoch``'s permutation (once)."""
        self._skip = (epoch, n)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        order += order[:len(self) * self.num_replicas - self.length]  # every rank the same count
        skip_epoch, n = self._skip
        if skip_epoch == self.epoch:
            order, self._skip = order[n:], (None, 0)
        return iter(order[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return -(-self.length // self.num_replicas)  # the same every epoch: a resumed pass is shorter, not its epoch


class PositionedDataLoader(DataLoader):
    """A DataLoader that tells Lightning it is resumable: its position lives in the ``ResumableRandomSampler``,
    which ``DataModule.resume_at`` places from the checkpoint's step, so there is no state of its own to save."""

    def state_dict(self) -> dict:
        """Nothing: the data position is restored from the checkpoint's step (``DataModule.resume_at``)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to load (see ``state_dict``)."""


class DataModule(L.LightningDataModule):
    """Train/val loaders; without `val`, a seeded `val_fraction` of `train` is held out. A bucketed dataset (one with
    ``bucket_ids``) is read in bucket-homogeneous batches (``ldm.data.bucket_sampler``), sharded over the ranks."""

    def __init__(
        self,
        train: Dataset,
        val: Dataset | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError(f"batch sizes must be positive, got {batch_size} and {val_batch_size}")
        if val is None and not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.batch_size, self.num_workers, self.seed, self.drop_last = batch_size, num_workers, seed, drop_last
        self.val_batch_size = val_batch_size or batch_size
        self.train_dataset, self.val_dataset = self._split(train, val, val_fraction)
        self.train_sampler = ResumableRandomSampler(len(self.train_dataset), seed)
        self._resume_batches = 0  # a bucketed loader's position on resume (its sampler is built per world size)

    def _split(self, train: Dataset, val: Dataset | None, fraction: float) -> tuple[Dataset, Dataset | None]:
        if val is not None or fraction == 0.0 or isinstance(train, StreamingDataset):  # streamed: its own val split
            return train, val
        n_val = max(1, round(len(train) * fraction))
        if n_val >= len(train):
            raise ValueError(f"val_fraction={fraction} leaves no training items out of {len(train)}")
        generator = torch.Generator().manual_seed(self.seed)
        held_in, held_out = random_split(train, [len(train) - n_val, n_val], generator=generator)
        return held_in, held_out

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler | None, drop_last: bool) -> DataLoader:
        if isinstance(dataset, StreamingDataset):  # litdata orders, splits over ranks and resumes it (its own state)
            return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers,
                                       pin_memory=torch.cuda.is_available(), drop_last=drop_last)
        return PositionedDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=drop_last,
        )

    def _ranks(self) -> tuple[int, int]:
        """(world size, rank) of the attached trainer; (1, 0) without one."""
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _bucket_loader(self, dataset: Dataset, bucket_ids: list[int], batch_size: int, train: bool) -> DataLoader:
        """Bucket-homogeneous batches of this rank (shuffled per epoch when training, in order otherwise)."""
        world_size, rank = self._ranks()
        lost = unplaceable(bucket_ids, world_size)
        if lost and not (train and self.drop_last):
            warnings.warn(f"{lost} item(s) of buckets with fewer items than the {world_size} ranks are left out",
                          stacklevel=2)
        sampler = BucketBatchSampler(dataset, bucket_ids, batch_size, world_size, rank, self.seed,
                                     drop_last=train and self.drop_last, shuffle=train)
        if train and self._resume_batches:
            epoch, done = divmod(self._resume_batches, max(len(sampler), 1))
            sampler.set_epoch(epoch)  # Lightning makes a resumed run's first iterator before it sets the epoch
            sampler.start_at(epoch, done)
        return DataLoader(BatchedView(dataset), batch_size=None, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded); drops the last partial batch unless the dataset is smaller than one batch."""
        bucket_ids = dataset_buckets(self.train_dataset)
        if bucket_ids is not None:
            return self._bucket_loader(self.train_dataset, bucket_ids, self.batch_size, train=True)
        drop_last = self.drop_last and len(self.train_dataset) >= self.batch_size
        self.train_sampler.shard(*self._ranks())
        return self._loader(self.train_dataset, self.batch_size, self.train_sampler, drop_last=drop_last)

    def resume_at(self, batches_done: int, world_size: int = 1) -> None:
        """Continue the data stream after ``batches_done`` training batches (of every process), as on resume; a
        streamed dataset's loader restores its own position from the checkpoint."""
        if isinstance(self.train_dataset, StreamingDataset):
            return
        self._resume_batches = batches_done
        drop_last = self.drop_last and len(self.train_dataset) >= self.batch_size
        per_rank = -(-len(self.train_dataset) // world_size)  # the sampler's share of each rank
        per_epoch = per_rank // self.batch_size if drop_last else -(-per_rank // self.batch_size)
        epoch, done = divmod(batches_done, max(per_epoch, 1))
        self.train_sampler.set_epoch(epoch)  # Lightning makes a resumed run's first iterator before it sets the epoch
        self.train_sampler.start_at(epoch, done * self.batch_size * world_size)

    def val_dataloader(self) -> DataLoader | list:
        """In order, every item; an empty list (no validation) when there is no val set."""
        if self.val_dataset is None:
            return []
        bucket_ids = dataset_buckets(self.val_dataset)
        if bucket_ids is not None:
            return self._bucket_loader(self.val_dataset, bucket_ids, self.val_batch_size, train=False)
        return self._loader(self.val_dataset, self.val_batch_size, None, drop_last=False)
