import json
import logging
import os
import shutil
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
    check_shard_coverage,
    decode_example,
    encode_example,
    iter_examples,
    read_shard,
    resolve_shards,
    write_shapeedit_shards,
)
from liveditor.errors import LIVEditorError

SMALL = ShapeEditConfig(frames=4, height=32, width=32)


@pytest.fixture(params=[0, 4_321])
def dataset(tmp_path, request):
    start = request.param
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
    (directory / "val-000002.tar").write_bytes(np.random.default_rng(5).bytes(2048))
    stats = ReadStats()
    with caplog.at_level(logging.WARNING):
        examples = list(iter_examples(directory, stats))
    assert len(examples) == 4  # shard 0 intact
    assert stats.corrupt_shards == 2 and stats.shards_read == 1 and stats.samples_read == 4
    assert "val-000001.tar" in caplog.text and "val-000002.tar" in caplog.text


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
        examples = list(iter_examples(str(tmp_path / "*.tar"), stats))
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


def _seeds(directory):
    return [ex.metadata["seed"] for ex in iter_examples(directory)]


def test_overwrite_replaces_every_old_shard(dataset):
    directory, _, start = dataset
    manifest = write_shapeedit_shards(directory, 3, "val", start + 100, samples_per_shard=4, config=SMALL,
                                      overwrite=True, progress=False)
    assert _seeds(directory) == list(range(start + 100, start + 103)), f"start {start}"
    assert sorted(p for p in os.listdir(directory) if p.endswith(".tar")) == ["val-000000.tar"]
    assert [s["name"] for s in manifest["shards"]] == ["val-000000.tar"]
    assert not [p for p in os.listdir(directory.parent) if p.startswith(".")]


class _Interrupted(Exception):
    pass


def _interrupt_after(monkeypatch, clips):
    from liveditor.data import shards

    calls = []

    def generate(*args, **kwargs):
        if len(calls) == clips:
            raise _Interrupted
        calls.append(args)
        return generate_example(*args, **kwargs)

    monkeypatch.setattr(shards, "generate_example", generate)


def test_interrupted_overwrite_keeps_the_old_dataset(dataset, monkeypatch):
    directory, _, start = dataset
    before = {p: (directory / p).read_bytes() for p in os.listdir(directory)}
    _interrupt_after(monkeypatch, 6)  # one full new shard of 4 written, then killed
    with pytest.raises(_Interrupted):
        write_shapeedit_shards(directory, 10, "val", start + 50, samples_per_shard=4, config=SMALL,
                               overwrite=True, progress=False)
    assert {p: (directory / p).read_bytes() for p in os.listdir(directory)} == before, f"start {start}"
    assert _seeds(directory) == list(range(start, start + 10))
    assert os.listdir(directory.parent) == [directory.name]  # no temporary folder left


def test_interrupted_write_leaves_no_dataset(tmp_path, monkeypatch):
    _interrupt_after(monkeypatch, 5)
    with pytest.raises(_Interrupted):
        write_shapeedit_shards(tmp_path / "ds", 10, "train", samples_per_shard=4, config=SMALL, progress=False)
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        list(iter_examples(tmp_path / "ds"))


def test_reader_follows_the_manifest(dataset):
    directory, _, start = dataset
    shutil.copy(directory / "val-000000.tar", directory / "val-000007.tar")  # stray shard, not listed
    assert _seeds(directory) == list(range(start, start + 10)), f"start {start}"
    assert [p.name for p in resolve_shards(directory)] == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]


def test_folder_without_manifest_is_not_a_dataset(dataset):
    directory, _, _ = dataset
    (directory / MANIFEST).unlink()
    with pytest.raises(LIVEditorError, match="index.json"):
        list(iter_examples(directory))
    # An explicit glob still reads whatever it names.
    assert len(list(iter_examples(str(directory / "*.tar")))) == 10


def test_missing_listed_shard_is_skipped_and_counted(dataset):
    directory, _, _ = dataset
    (directory / "val-000001.tar").unlink()
    stats = ReadStats()
    assert len(list(iter_examples(directory, stats))) == 6 and stats.corrupt_shards == 1


def test_overwrite_refuses_a_folder_that_is_not_a_dataset(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(LIVEditorError, match="not empty"):
        write_shapeedit_shards(folder, 2, config=SMALL, overwrite=True, progress=False)
    assert os.listdir(folder) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_shapeedit_shards(empty, 2, config=SMALL, progress=False)["num_samples"] == 2


def test_overwrite_refuses_the_current_folder(dataset, monkeypatch):
    directory, _, _ = dataset
    monkeypatch.chdir(directory)
    with pytest.raises(LIVEditorError, match="current folder"):
        write_shapeedit_shards(".", 2, "val", config=SMALL, overwrite=True, progress=False)
    assert len(list(iter_examples(directory))) == 10


@pytest.mark.parametrize("processes, workers, fits", [(1, 0, True), (3, 1, True), (2, 2, False), (1, 4, False)])
def test_too_few_shards_for_the_readers_is_a_one_line_error(dataset, processes, workers, fits):
    directory, _, _ = dataset  # 3 shards
    if fits:
        assert len(check_shard_coverage(directory, processes, workers)) == 3
    else:
        with pytest.raises(LIVEditorError, match=r"3 shards .* at least \d+ shards") as info:
            check_shard_coverage(directory, processes, workers)
        assert "\n" not in str(info.value)


def test_a_reader_without_shards_fails_instead_of_waiting(dataset):
    directory, _, _ = dataset  # 3 shards, 4 processes: rank 3 would get nothing
    stream = ShapeEditShards(directory, process_index=3, num_processes=4)
    with pytest.raises(LIVEditorError, match="3 shards"):
        next(iter(stream))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_read_stats_reach_the_main_process(dataset, num_workers):
    directory, _, _ = dataset
    (directory / "val-000001.tar").write_bytes(np.random.default_rng(6).bytes(2048))
    stream = ShapeEditShards(directory, shuffle=False)
    items = list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers))
    stats = stream.read_stats()
    assert len(items) == 6
    assert (stats.shards_read, stats.samples_read, stats.corrupt_shards, stats.corrupt_samples) == (2, 6, 1, 0)
    assert torch.equal(stats.as_tensor(), torch.tensor([2, 6, 1, 0]))
