"""The bucket batch order: bucket-homogeneous batches, one order from (seed, epoch), ranks drawing the same bucket at
each step with different items, every item once per epoch, and an exact continuation after a resume."""

from __future__ import annotations

import itertools

import torch
from torch.utils.data import Dataset

from ldm.data.bucket_sampler import BucketBatchSampler, epoch_batches, rank_share
from ldm.data.module import DataModule

BUCKETS = [0] * 13 + [1] * 7 + [2] * 1 + [3] * 4  # 25 items in four buckets of uneven size


class Items(Dataset):
    """Items whose tensor has its bucket's size, so batches only collate within a bucket."""

    def __init__(self, bucket_ids):
        self.bucket_ids = list(bucket_ids)

    def __len__(self):
        return len(self.bucket_ids)

    def __getitem__(self, index):
        return {"index": index, "mean": torch.zeros(1, 2 + self.bucket_ids[index], 2)}


class PlainItems(Dataset):
    """Items of one size (no buckets)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return {"index": index}


def rank_batches(world, epoch, batch=2, skip=0, drop_last=False):
    samplers = [BucketBatchSampler(Items(BUCKETS), BUCKETS, batch, world, rank, seed=3, drop_last=drop_last)
                for rank in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
        if skip:
            s.start_at(epoch, skip)
    return [list(s) for s in samplers]


def test_every_item_once_per_epoch_in_homogeneous_batches():
    for world in (1, 2, 3):
        per_rank = rank_batches(world, epoch=0)
        assert len({len(b) for b in per_rank}) == 1  # every rank takes the same number of steps
        seen = [i for batches in per_rank for batch in batches for i in batch]
        lost = sum(1 for b in set(BUCKETS) if BUCKETS.count(b) < world)  # bucket 2 has one item
        assert sorted(seen) == sorted(i for i in range(len(BUCKETS)) if BUCKETS.count(BUCKETS[i]) >= world)
        assert len(seen) == len(BUCKETS) - lost
        for step in zip(*per_rank):
            assert len({BUCKETS[i] for batch in step for i in batch}) == 1  # one bucket per step on every rank
            assert all(step) and not set(step[0]) & set(itertools.chain(*step[1:]))


def test_order_is_a_function_of_seed_and_epoch():
    assert rank_batches(2, epoch=1) == rank_batches(2, epoch=1)
    assert rank_batches(2, epoch=1) != rank_batches(2, epoch=2)
    assert epoch_batches(BUCKETS, 2, 2, seed=3, epoch=1) != epoch_batches(BUCKETS, 2, 2, seed=4, epoch=1)


def test_resume_skips_exactly_the_batches_done():
    full = rank_batches(2, epoch=4)
    for done in (1, 3, 5):
        resumed = rank_batches(2, epoch=4, skip=done)
        assert [b[done:] for b in full] == resumed


def test_drop_last_drops_each_buckets_remainder():
    batches = epoch_batches(BUCKETS, 2, 2, seed=0, epoch=0, drop_last=True)
    assert all(len(b) == 4 for b in batches) and len(batches) == 13 // 4 + 7 // 4 + 4 // 4
    small = epoch_batches([0] * 3 + [1] * 9, 2, 2, seed=0, epoch=0, drop_last=True)
    assert sorted(len(b) for b in small) == [3, 4, 4]  # a bucket smaller than one batch stays, whole


def test_rank_share_splits_near_equally():
    assert [rank_share(list(range(5)), r, 2) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [rank_share(list(range(9)), r, 2) for r in range(2)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8]]


def test_datamodule_serves_bucket_batches_and_resumes_mid_epoch():
    dm = DataModule(Items(BUCKETS), val=Items(BUCKETS), batch_size=3, drop_last=False, seed=1)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    first = [b["index"].tolist() for b in loader]
    assert sorted(i for b in first for i in b) == list(range(len(BUCKETS)))
    assert all(len({BUCKETS[i] for i in b}) == 1 for b in first)
    val = [b["index"].tolist() for b in dm.val_dataloader()]
    assert [i for b in val for i in b] == sorted(range(len(BUCKETS)), key=lambda i: (BUCKETS[i], i))
    resumed = DataModule(Items(BUCKETS), batch_size=3, drop_last=False, seed=1, val_fraction=0.0)
    resumed.resume_at(len(first) + 2)  # epoch 1, two batches in
    loader = resumed.train_dataloader()
    loader.sampler.set_epoch(1)
    epoch1 = [b["index"].tolist() for b in loader]
    whole = BucketBatchSampler(Items(BUCKETS), BUCKETS, 3, seed=1)
    whole.set_epoch(1)
    assert epoch1 == list(whole)[2:]


def test_a_resumed_loader_draws_the_resumed_epoch_before_lightning_sets_it():
    """Lightning makes a resumed run's first iterator before ``set_epoch``: resuming into epoch 2 must not replay
    epoch 0 (plain and bucketed loaders)."""
    plain = DataModule(PlainItems(12), batch_size=3, seed=5, val_fraction=0.0)
    reference = list(plain.train_sampler)  # epoch 0
    plain.resume_at(2 * 4 + 1)  # 4 batches per epoch: epoch 2, one batch in
    order = [i for batch in plain.train_dataloader() for i in batch["index"].tolist()]
    expected = torch.randperm(12, generator=torch.Generator().manual_seed(5 + 2)).tolist()[3:]
    assert order == expected != reference[3:]
    bucketed = DataModule(Items(BUCKETS), batch_size=3, drop_last=False, seed=1, val_fraction=0.0)
    per_epoch = len(bucketed.train_dataloader().sampler)
    bucketed.resume_at(2 * per_epoch + 1)
    got = [b["index"].tolist() for b in bucketed.train_dataloader()]
    whole = BucketBatchSampler(Items(BUCKETS), BUCKETS, 3, seed=1)
    whole.set_epoch(2)
    assert got == list(whole)[1:]


def test_a_held_out_fraction_keeps_the_buckets():
    dm = DataModule(Items(BUCKETS), batch_size=2, drop_last=False, val_fraction=0.2, seed=0)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batches = [b["index"].tolist() for b in loader]
        assert all(len({BUCKETS[i] for i in b}) == 1 for b in batches)
    assert len(dm.train_dataset) + len(dm.val_dataset) == len(BUCKETS)
