"""LightningDataModule over datasets the config loader has already built (`train`, optional `val`)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, random_split


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

    def _split(self, train: Dataset, val: Dataset | None, fraction: float) -> tuple[Dataset, Dataset | None]:
        if val is not None or fraction == 0.0:
            return train, val
        n_val = max(1, round(len(train) * fraction))
        if n_val >= len(train):
            raise ValueError(f"val_fraction={fraction} leaves no training items out of {len(train)}")
        generator = torch.Generator().manual_seed(self.seed)
        held_in, held_out = random_split(train, [len(train) - n_val, n_val], generator=generator)
        return held_in, held_out

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=drop_last,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded); drops the last partial batch unless the dataset is smaller than one batch."""
        drop_last = self.drop_last and len(self.train_dataset) >= self.batch_size
        return self._loader(self.train_dataset, self.batch_size, shuffle=True, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader | list:
        """In order, every item; an empty list (no validation) when there is no val set."""
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.val_batch_size, shuffle=False, drop_last=False)
