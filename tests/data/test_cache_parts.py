"""What one part of a litdata cache build sends to its workers: the part's items alone (``PartOf``), read by their
index in the dataset exactly as the whole dataset gives them — not the folder's listing, whose size grows with it."""

import pickle

import torch

from ldm.data.folder import ImageFolderDataset
from ldm.data.streaming import PartOf
from tests.aspect_folder import make_aspect_folder


def folder(root, n: int) -> ImageFolderDataset:
    return ImageFolderDataset(str(make_aspect_folder(root, n=n)), size=16, captions="metadata",
                              buckets={"resolution": 16, "step": 4})


def test_a_part_reads_its_items_by_their_index_in_the_dataset(tmp_path):
    dataset = folder(tmp_path / "images", 12)
    indices = [i for i, b in enumerate(dataset.bucket_ids) if b == dataset.bucket_ids[5]]
    part = pickle.loads(pickle.dumps(PartOf(dataset, indices)))  # as a worker receives it
    assert len(part) == len(indices) and len(indices) < len(dataset)
    for index in indices:
        got, want = part[index], dataset[index]
        assert got.keys() == want.keys() and got["caption"] == want["caption"] and got["path"] == want["path"]
        assert torch.equal(got["image"], want["image"]) and torch.equal(got["crop_top_left"], want["crop_top_left"])


def test_what_a_part_sends_does_not_grow_with_the_folder(tmp_path):
    small, large = folder(tmp_path / "small", 12), folder(tmp_path / "large", 96)
    whole = len(pickle.dumps(large)) - len(pickle.dumps(small))
    part = len(pickle.dumps(PartOf(large, [0, 1]))) - len(pickle.dumps(PartOf(small, [0, 1])))
    assert whole > 84 * 100  # the whole dataset carries every item's record (>100 bytes each)
    assert abs(part) < whole / 20  # a two-item part carries two, whatever the folder's size
