import json
import logging
import os
import random
import tarfile

import numpy as np
import pytest
import torch

from liveditor.data.shapes import ShapeEditConfig, generate_example
from liveditor.data.shards import (
    MANIFEST,
    ReadStats,
    ShapeEditDataset,
    ShapeEditShards,
    ShardWriter,
    decode_example,
    encode_example,
    iter_examples,
    read_shard,
    write_shapeedit_shards,
)
from liveditor.errors import LIVEditorError

SMALL = ShapeEditConfig(frames=4, height=32, width=32)


@pytest.fixture
def dataset(tmp_path):
    start = random.randrange(10_000)
    manifest = write_shapeedit_shards(tmp_path / "ds", 10, "val", start, samples_per_shard=4, config=SMALL, progress=False)
    return tmp_path / "ds", manifest, start


def test_round_trip_is_lossless(dataset):
    directory, manifest, start = dataset
    assert [s["num_samples"] for s in manifest["shards"]] == [4, 4, 2]
    assert json.loads((directory / MANIFEST).read_text())["num_samples"] == 10
    examples = list(iter_examples(directory))
    assert len(examples) == 10
    for i, ex in enumerate(examples):
        ref = generate_example(start + i, "val", config=SMALL)
        assert np.array_equal(ex.source, ref.source) and np.array_equal(ex.target, ref.target)
        assert np.array_equal(ex.object_mask, ref.object_mask) and np.array_equal(ex.edit_mask, ref.edit_mask)
        assert (ex.instruction, ex.family) == (ref.instruction, ref.family)
        assert ex.metadata["seed"] == start + i
    assert not [p for p in os.listdir(directory) if p.endswith(".tmp")]


def test_webdataset_layout(dataset):
    directory, _, start = dataset
    with tarfile.open(directory / "val-000000.tar") as tar:
        names = tar.getnames()
    assert names[:4] == [f"val-{start:08d}.{ext}" for ext in ("json", "source.png", "target.png", "mask.png")]


def test_existing_dataset_is_not_overwritten(dataset):
    directory, _, _ = dataset
    before = {p: (directory / p).read_bytes() for p in os.listdir(directory)}
    with pytest.raises(LIVEditorError, match="overwrite"):
        write_shapeedit_shards(directory, 3, "val", config=SMALL, progress=False)
    assert {p: (directory / p).read_bytes() for p in os.listdir(directory)} == before


def test_corrupt_shard_is_skipped_and_counted(dataset, caplog):
    directory, _, _ = dataset
    shard = directory / "val-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])  # truncated mid-file
    (directory / "val-000003.tar").write_bytes(os.urandom(2048))
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        examples = list(iter_examples(directory, stats))
    assert len(examples) == 6  # shards 0 and 2 intact
    assert stats.corrupt_shards == 2 and stats.shards_read == 2 and stats.samples_read == 6
    assert "val-000001.tar" in caplog.text and "val-000003.tar" in caplog.text


def test_corrupt_sample_is_skipped_and_counted(tmp_path, caplog):
    good = encode_example(generate_example(1, "train", config=SMALL))
    bad_image = dict(good, **{"target.png": b"not a png"})
    missing = {k: v for k, v in good.items() if k != "mask.png"}
    with ShardWriter(tmp_path, prefix="t", samples_per_shard=10) as writer:
        writer.write("a", good)
        writer.write("b", bad_image)
        writer.write("c", missing)
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        examples = list(iter_examples(tmp_path, stats))
    assert len(examples) == 1 and stats.corrupt_samples == 2
    assert "mask.png" in caplog.text and "undecodable" in caplog.text


def test_decode_rejects_inconsistent_header():
    files = encode_example(generate_example(2, "train", config=SMALL))
    header = json.loads(files["json"])
    header["frames"] = 5
    with pytest.raises(ValueError, match="do not match"):
        decode_example(dict(files, json=json.dumps(header).encode()))


def test_writer_abort_leaves_no_partial_shard(tmp_path):
    files = encode_example(generate_example(3, "train", config=SMALL))
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, prefix="x", samples_per_shard=2) as writer:
            writer.write("k1", files)
            writer.write("k2", files)  # completes shard 0
            writer.write("k3", files)
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["x-000000.tar"]
    assert len(read_shard(tmp_path / "x-000000.tar")) == 2


def test_writer_rejects_bad_keys(tmp_path):
    with ShardWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match="key"):
            writer.write("a.b", {"json": b"{}"})
        writer.write("a", {"json": b"{}"})
        with pytest.raises(ValueError, match="duplicate"):
            writer.write("a", {"json": b"{}"})


def test_stream_splits_shards_between_processes(dataset):
    directory, _, _ = dataset
    seen = []
    for rank in range(2):
        stream = ShapeEditShards(directory, shuffle=True, seed=3, process_index=rank, num_processes=2)
        seen.append([item["instruction"] + str(item["source"].sum().item()) for item in stream])
    assert len(seen[0]) + len(seen[1]) == 10
    everything = [ex.instruction + str(int(ex.source.astype(np.int64).sum())) for ex in iter_examples(directory)]
    assert sorted(seen[0] + seen[1]) == sorted(everything)
    item = next(iter(ShapeEditShards(directory)))
    assert item["source"].shape == (4, 32, 32, 3) and item["source"].dtype == torch.uint8


def test_missing_shards():
    with pytest.raises(FileNotFoundError):
        list(iter_examples("/nonexistent/shards"))


def test_on_the_fly_dataset():
    ds = ShapeEditDataset(3, "train", start_seed=5, config=SMALL)
    item = ds[1]
    ref = generate_example(6, "train", config=SMALL)
    assert item["instruction"] == ref.instruction
    assert item["target"].dtype == torch.uint8
    assert torch.equal(item["target"], torch.from_numpy(ref.target))
    with pytest.raises(IndexError):
        ds[3]


def test_shard_cut_between_members_is_corrupt(dataset):
    directory, _, _ = dataset
    shard = directory / "val-000000.tar"
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[5].offset  # a clean member boundary inside sample 2
    shard.write_bytes(shard.read_bytes()[:cut])
    stats = ReadStats()
    assert read_shard(shard, stats) == [] and stats.corrupt_shards == 1
