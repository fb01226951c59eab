"""DataModule: held-out split, seeded shuffling, loaders yield the batch format, built from config."""

import lightning as L
import pytest
import torch

from ldm.core.config import instantiate_from_config
from ldm.data.module import DataModule
from ldm.data.shapes import ShapesDataset


def _paths(loader) -> list[str]:
    return [p for batch in loader for p in batch["path"]]


def test_held_out_split_sizes_and_determinism():
    dm = DataModule(ShapesDataset(size=8, length=100), batch_size=8, val_fraction=0.1, seed=3)
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (90, 10)
    again = DataModule(ShapesDataset(size=8, length=100), batch_size=8, val_fraction=0.1, seed=3)
    assert list(dm.val_dataset.indices) == list(again.val_dataset.indices)
    assert set(dm.train_dataset.indices).isdisjoint(dm.val_dataset.indices)
    other = DataModule(ShapesDataset(size=8, length=100), val_fraction=0.1, seed=4)
    assert list(dm.val_dataset.indices) != list(other.val_dataset.indices)
    assert len(DataModule(ShapesDataset(size=8, length=10), val_fraction=0.01).val_dataset) == 1


def test_explicit_val_and_no_val():
    train, val = ShapesDataset(size=8, length=20), ShapesDataset(size=8, length=6, split="val")
    dm = DataModule(train, val, batch_size=4, val_batch_size=5)
    assert dm.train_dataset is train and dm.val_dataset is val
    assert [len(b["path"]) for b in dm.val_dataloader()] == [5, 1]
    assert _paths(dm.val_dataloader()) == [f"shapes/val/{i}" for i in range(6)]  # in order
    none = DataModule(train, val_fraction=0.0)
    assert none.val_dataset is None and none.val_dataloader() == []
    with pytest.raises(ValueError):
        DataModule(train, val_fraction=1.0)


def test_train_loader_batches_shuffle_with_seed_and_drop_last():
    dm = DataModule(ShapesDataset(size=16, length=30, hint=True), batch_size=8, val_fraction=0.1, seed=1)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 16, 16) and batch["hint"].shape == (8, 3, 16, 16)
    assert batch["label"].dtype == torch.int64 and len(batch["caption"]) == 8 and len(batch["path"]) == 8
    order = _paths(dm.train_dataloader())
    assert len(order) == 24  # 27 items, last partial batch dropped
    twin = DataModule(ShapesDataset(size=16, length=30, hint=True), batch_size=8, val_fraction=0.1, seed=1)
    assert _paths(twin.train_dataloader()) == order
    assert sorted(order) != order  # shuffled
    small = DataModule(ShapesDataset(size=8, length=5), batch_size=8, val_fraction=0.0)
    assert len(_paths(small.train_dataloader())) == 5  # smaller than a batch: nothing dropped


def test_workers_are_persistent():
    dm = DataModule(ShapesDataset(size=8, length=20), batch_size=4, num_workers=2)
    assert dm.train_dataloader().persistent_workers and dm.val_dataloader().num_workers == 2
    assert not DataModule(ShapesDataset(size=8, length=20)).train_dataloader().persistent_workers


def test_built_from_nested_config():
    node = {
        "target": "ldm.data.module.DataModule",
        "params": {
            "train": {"target": "ldm.data.shapes.ShapesDataset", "params": {"size": 8, "length": 40}},
            "batch_size": 4,
            "val_fraction": 0.25,
        },
    }
    dm = instantiate_from_config(node, "data")
    assert isinstance(dm, L.LightningDataModule) and len(dm.val_dataset) == 10


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Conv2d(3, 3, 1)

    def training_step(self, batch, _):
        return self.net(batch["image"]).pow(2).mean()

    def validation_step(self, batch, _):
        self.log("val", self.net(batch["image"]).pow(2).mean(), batch_size=len(batch["path"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("val_fraction", [0.2, 0.0])
def test_lightning_fit(tmp_path, val_fraction):
    dm = DataModule(ShapesDataset(size=8, length=20), batch_size=4, val_fraction=val_fraction)
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(_Tiny(), datamodule=dm)
    assert trainer.global_step == 2
