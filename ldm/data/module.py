"""LightningDataModule over datasets the config loader has already built (`train`, optional `val`)."""

from __future__ import annotations

from typing import Iterator

import lightning as L
import torch
from litdata import StreamingDataLoader, StreamingDataset
from torch.utils.data import DataLoader, Dataset, Sampler, random_split


class ResumableRandomSampler(Sampler[int]):
    """A seeded permutation per epoch (seed + epoch) that can start part-way through one.

    Lightning calls ``set_epoch`` at each epoch start; ``start_at(epoch, n)`` makes that epoch's next
    pass skip its first ``n`` indices, so a resumed run sees exactly the items it had not seen yet.
    """

    def __init__(self, length: int, seed: int = 0):
        self.length, self.seed, self.epoch, self._skip = length, seed, 0, (None, 0)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose permutation the next pass draws."""
        self.epoch = epoch

    def start_at(self, epoch: int, n: int) -> None:
        """Skip the first ``n`` indices of ``epoch``'s permutation (once)."""
        self._skip = (epoch, n)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        skip_epoch, n = self._skip
        if skip_epoch == self.epoch:
            order, self._skip = order[n:], (None, 0)
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.length


class DataModule(L.LightningDataModule):
    """Train/val loaders; without `val`, a seeded `val_fraction` of `train` is held out."""

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
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=drop_last,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded); drops the last partial batch unless the dataset is smaller than one batch."""
        drop_last = self.drop_last and len(self.train_dataset) >= self.batch_size
        return self._loader(self.train_dataset, self.batch_size, self.train_sampler, drop_last=drop_last)

    def resume_at(self, batches_done: int, world_size: int = 1) -> None:
        """Continue the data stream after ``batches_done`` training batches (of every process), as on resume; a
        streamed dataset's loader restores its own position from the checkpoint."""
        if isinstance(self.train_dataset, StreamingDataset):
            return
        drop_last = self.drop_last and len(self.train_dataset) >= self.batch_size
        per_epoch = (len(self.train_dataset) // (self.batch_size * world_size) if drop_last
                     else -(-len(self.train_dataset) // (self.batch_size * world_size)))
        epoch, done = divmod(batches_done, max(per_epoch, 1))
        self.train_sampler.start_at(epoch, done * self.batch_size * world_size)

    def val_dataloader(self) -> DataLoader | list:
        """In order, every item; an empty list (no validation) when there is no val set."""
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.val_batch_size, None, drop_last=False)
