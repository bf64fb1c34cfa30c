"""Training shards: WebDataset-style tar files, written and read with the standard library.

Layout of a shard (``<prefix>-000000.tar``): samples are consecutive groups of files sharing a
key (the part of the member name before the first dot), as WebDataset expects::

    train-00000042.json        instruction, family, geometry, scene metadata
    train-00000042.source.png  the input video, frames stacked vertically (F*H x W, RGB)
    train-00000042.target.png  the edited video, same layout
    train-00000042.mask.png    the edited object's mask per frame (grey, 0/255)

A folder of shards has an ``index.json`` manifest (format, split, seeds, shard names and counts,
clip geometry), and readers read the shards it lists, nothing else: a folder without one is not
a dataset. `write_shapeedit_shards` builds the whole folder beside its destination and renames it
into place (`liveditor.atomic.atomic_directory`), so an interrupted run leaves the previous
dataset (or nothing), never a half-written set, and ``overwrite`` leaves no old shard behind.
Readers skip a corrupt or missing shard, or a corrupt sample, with a logged warning and count it
in ``ReadStats``; `ShapeEditShards.read_stats()` sums what every DataLoader worker counted.

The same writer/reader take any ``{extension: bytes}`` samples, so the real data pipeline (VAE
latents, text embeddings) reuses them with other extensions.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..atomic import atomic_directory, atomic_output, publish_file, temporary_path
from ..errors import InputNotFoundError, InvalidArgumentError, LIVEditorError
from .shapes import FAMILIES, SPLITS, ShapeEditConfig, ShapeEditExample, generate_example

logger = logging.getLogger(__name__)

MANIFEST = "index.json"
FORMAT = "liveditor-shapeedit-webdataset-v1"


# ---------------------------------------------------------------------------------------------
# Sample encoding


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _png_array(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return np.asarray(image)


def encode_example(example: ShapeEditExample) -> dict[str, bytes]:
    """A ShapeEdit example as WebDataset sample files ``{extension: bytes}``."""
    F, H, W, _ = example.source.shape
    header = {
        "instruction": example.instruction,
        "family": example.family,
        "frames": F,
        "height": H,
        "width": W,
        "metadata": example.metadata,
    }
    return {
        "json": json.dumps(header, sort_keys=True).encode("utf-8"),
        "source.png": _png_bytes(example.source.reshape(F * H, W, 3)),
        "target.png": _png_bytes(example.target.reshape(F * H, W, 3)),
        "mask.png": _png_bytes(example.object_mask.reshape(F * H, W).astype(np.uint8) * 255),
    }


def decode_example(files: dict[str, bytes]) -> ShapeEditExample:
    """Inverse of ``encode_example``; raises ``ValueError`` naming what is wrong with a sample."""
    missing = [ext for ext in ("json", "source.png", "target.png", "mask.png") if ext not in files]
    if missing:
        raise ValueError(f"sample lacks {', '.join(missing)}")
    try:
        header = json.loads(files["json"].decode("utf-8"))
        F, H, W = int(header["frames"]), int(header["height"]), int(header["width"])
        instruction, family = str(header["instruction"]), str(header["family"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad json header: {exc}") from exc
    try:
        source, target, mask = (_png_array(files[ext]) for ext in ("source.png", "target.png", "mask.png"))
    except Exception as exc:  # PIL raises many types for broken images
        raise ValueError(f"undecodable image: {exc}") from exc
    if source.shape != (F * H, W, 3) or target.shape != (F * H, W, 3) or mask.shape != (F * H, W):
        raise ValueError(
            f"image shapes {source.shape}, {target.shape}, {mask.shape} do not match {F} frames of {H}x{W}"
        )
    source = source.reshape(F, H, W, 3)
    target = target.reshape(F, H, W, 3)
    return ShapeEditExample(
        source=source,
        target=target,
        instruction=instruction,
        family=family,
        object_mask=mask.reshape(F, H, W) > 127,
        edit_mask=np.any(source != target, axis=-1),
        metadata=header.get("metadata", {}),
    )


# ---------------------------------------------------------------------------------------------
# Writer


class ShardWriter:
    """Write samples into numbered tar shards of at most ``samples_per_shard`` samples.

    Each shard is written to a temporary file and renamed into place when full or on ``close()``.
    Existing shards are never overwritten unless ``overwrite=True``.
    """

    def __init__(self, directory, prefix: str = "shard", samples_per_shard: int = 500, overwrite: bool = False):
        if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be a positive int, got {samples_per_shard!r}")
        if not prefix or "/" in prefix or "." in prefix:
            raise ValueError(f"shard prefix must be a plain name without dots or slashes, got {prefix!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.overwrite = overwrite
        self.shards: list[dict] = []  # {"name", "num_samples"} of finished shards
        self._tar = None
        self._tmp_path = None
        self._count = 0
        self._keys: set[str] = set()

    def _shard_path(self, index: int) -> Path:
        return self.directory / f"{self.prefix}-{index:06d}.tar"

    def _open(self) -> None:
        path = self._shard_path(len(self.shards))
        if path.exists() and not self.overwrite:
            raise LIVEditorError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
        self._tmp_path = temporary_path(path)
        self._tar = tarfile.open(self._tmp_path, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _finish(self) -> None:
        self._tar.close()
        path = self._shard_path(len(self.shards))
        publish_file(self._tmp_path, path)
        self.shards.append({"name": path.name, "num_samples": self._count})
        self._tar = self._tmp_path = None

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key must be a plain name without dots or slashes, got {key!r}")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        if not files:
            raise ValueError(f"sample {key!r} has no files")
        if self._tar is None:
            self._open()
        mtime = int(time.time())
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = mtime
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.add(key)
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._finish()

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (finished shards stay)."""
        if self._tar is not None:
            self._tar.close()
            os.unlink(self._tmp_path)
            self._tar = self._tmp_path = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_manifest(directory, manifest: dict) -> Path:
    path = Path(directory) / MANIFEST
    with atomic_output(path, "w") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return path


def write_shapeedit_shards(
    directory,
    num_examples: int,
    split: str = "train",
    start_seed: int = 0,
    samples_per_shard: int = 500,
    config: ShapeEditConfig | None = None,
    families: Iterable[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Generate ShapeEdit examples ``start_seed .. start_seed+num_examples-1`` of ``split`` into
    shards in ``directory`` and write its manifest; returns the manifest.

    Example ``seed`` has family ``families[seed % len(families)]`` (default all six, balanced;
    the same clips as ``generate_example(seed, split)``). ``directory`` must be new, empty, or
    (with ``overwrite``) a dataset folder. The new folder is built beside it and swapped in when
    complete: an interruption leaves the old dataset (or nothing), and no old shard survives.
    """
    from tqdm.auto import tqdm

    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise InvalidArgumentError(f"num_examples must be a positive int, got {num_examples!r}")
    if isinstance(start_seed, bool) or not isinstance(start_seed, int) or start_seed < 0:
        raise InvalidArgumentError(f"start_seed must be a non-negative int, got {start_seed!r}")
    if split not in SPLITS:
        raise InvalidArgumentError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    families = tuple(FAMILIES if families is None else families)
    unknown = [f for f in families if f not in FAMILIES]
    if not families or unknown:
        raise InvalidArgumentError(f"unknown edit families {unknown or families!r}; known: {', '.join(FAMILIES)}")
    config = ShapeEditConfig() if config is None else config
    directory = Path(os.path.abspath(directory))  # "." or "out/" has a name to build beside
    _check_replaceable(directory, overwrite)

    with atomic_directory(directory, replace=directory.exists()) as staging:
        with ShardWriter(staging, prefix=split, samples_per_shard=samples_per_shard) as writer:
            for i in tqdm(range(num_examples), desc=f"ShapeEdit {split}", unit="clip", disable=not progress):
                seed = start_seed + i
                example = generate_example(seed, split, families[seed % len(families)], config)
                writer.write(f"{split}-{seed:08d}", encode_example(example))
        manifest = {
            "format": FORMAT,
            "split": split,
            "start_seed": start_seed,
            "num_samples": num_examples,
            "families": list(families),
            "config": config.__dict__.copy(),
            "shards": writer.shards,
        }
        write_manifest(staging, manifest)
    return manifest


def _check_replaceable(directory: Path, overwrite: bool) -> None:
    """A dataset folder may replace nothing, an empty folder, or (with ``overwrite``) a dataset."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise LIVEditorError(f"{directory} is a file, not a folder")
    cwd = Path.cwd()
    if cwd == directory or directory in cwd.parents:
        raise LIVEditorError(f"{directory} holds the current folder, which replacing it would delete; write elsewhere")
    if (directory / MANIFEST).exists():
        if not overwrite:
            raise LIVEditorError(f"{directory} already holds a dataset ({MANIFEST}); pass --overwrite to replace it")
    elif any(directory.iterdir()):
        raise LIVEditorError(
            f"{directory} is not empty and holds no dataset ({MANIFEST}); choose another folder or empty it"
        )


# ---------------------------------------------------------------------------------------------
# Reader


@dataclass
class ReadStats:
    """What a reader skipped. Counted, never silent."""

    shards_read: int = 0
    samples_read: int = 0
    corrupt_shards: int = 0
    corrupt_samples: int = 0
    problems: list[str] = field(default_factory=list)

    COUNTS = ("shards_read", "samples_read", "corrupt_shards", "corrupt_samples")

    def _note(self, message: str) -> None:
        logger.warning(message)
        if len(self.problems) < 100:
            self.problems.append(message)

    def as_tensor(self) -> torch.Tensor:
        """The counts (``COUNTS`` order) as int64 ``[4]``, e.g. to sum over processes with an all-reduce."""
        return torch.tensor([getattr(self, name) for name in self.COUNTS], dtype=torch.int64)


def read_manifest(directory) -> dict:
    """The manifest of a dataset folder; a folder without a valid one is not a (finished) dataset."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise LIVEditorError(
            f"{directory} has no {MANIFEST}: not a finished dataset (write one with liveditor make-data, "
            "or name shard files or a glob)"
        )
    try:
        manifest = json.loads(path.read_text())
        names = [entry["name"] for entry in manifest["shards"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise LIVEditorError(f"{path} is not a valid dataset manifest: {exc}") from exc
    if not all(isinstance(n, str) and n and os.path.basename(n) == n and n not in (".", "..") for n in names):
        raise LIVEditorError(f"{path} lists shard names that are not plain file names")
    return manifest


def resolve_shards(source) -> list[Path]:
    """Shard paths from a dataset folder (the shards its manifest lists), a glob pattern, a file,
    or a list of those."""
    if isinstance(source, (list, tuple)):
        paths = [p for item in source for p in resolve_shards(item)]
    else:
        text = os.fspath(source)
        if os.path.isdir(text):
            paths = [Path(text) / entry["name"] for entry in read_manifest(text)["shards"]]
        elif any(ch in text for ch in "*?["):
            paths = [Path(p) for p in sorted(glob.glob(text))]
        elif os.path.isfile(text):
            paths = [Path(text)]
        else:
            raise InputNotFoundError(f"no shard file, folder or pattern at {text}")
    if not paths:
        raise InputNotFoundError(f"no .tar shards found in {source}")
    return paths


def check_shard_coverage(source, world_size: int, num_workers: int) -> list[Path]:
    """The shards of ``source``, if there are enough for every reader; else a one-line error.

    Each of the ``world_size`` processes x ``num_workers`` DataLoader workers (0 = the process
    itself) reads its own shards; one without any would wait forever in a distributed step. Call
    it on every process before building the loaders; all processes see the same shards, so all
    stop together.
    """
    for name, value in (("world_size", world_size), ("num_workers", num_workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    paths = resolve_shards(source)
    readers = max(1, world_size) * max(1, num_workers)
    if len(paths) < readers:
        raise LIVEditorError(
            f"{source} holds {len(paths)} shards but {world_size} processes x {max(1, num_workers)} loader workers "
            f"read it: write at least {readers} shards (liveditor make-data --samples-per-shard) or use fewer workers"
        )
    return paths


def _group_samples(members: list[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    key, files = None, {}
    for name, data in members:
        base = os.path.basename(name)
        sample_key, _, ext = base.partition(".")
        if sample_key != key:
            if key is not None:
                yield key, files
            key, files = sample_key, {}
        files[ext] = data
    if key is not None:
        yield key, files


def read_shard(path, stats: ReadStats | None = None) -> list[tuple[str, dict[str, bytes]]]:
    """All ``(key, files)`` samples of one shard, or ``[]`` (warned, counted) if it is corrupt.

    The whole shard is read before anything is returned, so a truncated shard yields nothing
    rather than a silent prefix of itself.
    """
    stats = ReadStats() if stats is None else stats
    members = []
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"{member.name} is truncated")
                members.append((member.name, data))
            # tarfile stops quietly at a cut between members; a complete archive ends with two
            # zero blocks.
            raw.seek(tar.offset)
            if raw.read(1024) != bytes(1024):
                raise tarfile.ReadError("archive is truncated (no end-of-archive marker)")
    except (tarfile.TarError, EOFError, OSError) as exc:
        stats.corrupt_shards += 1
        stats._note(f"skipping corrupt shard {path}: {exc}")
        return []
    stats.shards_read += 1
    return list(_group_samples(members))


def iter_examples(source, stats: ReadStats | None = None) -> Iterator[ShapeEditExample]:
    """Decoded ShapeEdit examples from shards (see ``resolve_shards``), skipping corrupt ones."""
    stats = ReadStats() if stats is None else stats
    for path in resolve_shards(source):
        for key, files in read_shard(path, stats):
            try:
                example = decode_example(files)
            except ValueError as exc:
                stats.corrupt_samples += 1
                stats._note(f"skipping corrupt sample {key} in {path}: {exc}")
                continue
            stats.samples_read += 1
            yield example


def example_to_tensors(example: ShapeEditExample) -> dict:
    """Training view of an example: videos as uint8 ``[F, H, W, 3]`` tensors (4x less to move
    between loader workers than float; `liveditor.training.video_batch_to_model` converts a batch
    on the device)."""
    return {
        "source": torch.from_numpy(np.require(example.source, requirements=("C", "W"))),
        "target": torch.from_numpy(np.require(example.target, requirements=("C", "W"))),
        "instruction": example.instruction,
        "family": example.family,
    }


MAX_WORKERS = 64  # DataLoader workers per process that `ShapeEditShards` keeps counts for


class ShapeEditShards(IterableDataset):
    """Stream examples from shards, split over DataLoader workers and distributed processes.

    Each (process, worker) reads its own subset of shards, so use at least
    ``num_processes * num_workers`` shards (`check_shard_coverage`); a reader left without one
    raises instead of waiting. ``set_epoch`` reshuffles shard and sample order. `read_stats()`
    returns, in the main process, what all of this process's workers read and skipped.
    """

    def __init__(self, source, shuffle: bool = True, seed: int = 0, process_index: int = 0, num_processes: int = 1):
        self.paths = resolve_shards(source)
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} must be in [0, {num_processes})")
        self.source = source
        self.shuffle = shuffle
        self.seed = seed
        self.process_index = process_index
        self.num_processes = num_processes
        self.epoch = 0
        # One row of counts per worker, in shared memory: workers are other processes, and each
        # writes only its own row.
        self._counts = torch.zeros(MAX_WORKERS, len(ReadStats.COUNTS), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def read_stats(self) -> ReadStats:
        """Shards and samples read and skipped so far by every worker of this process."""
        return ReadStats(**dict(zip(ReadStats.COUNTS, self._counts.sum(0).tolist())))

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        if num_workers > MAX_WORKERS:
            raise ValueError(f"ShapeEditShards supports at most {MAX_WORKERS} DataLoader workers, got {num_workers}")
        slot, slots = self.process_index * num_workers + worker_id, self.num_processes * num_workers
        if len(self.paths) < slots:
            raise LIVEditorError(
                f"{self.source} holds {len(self.paths)} shards but {self.num_processes} processes x {num_workers} "
                f"loader workers read it: write at least {slots} shards or use fewer workers"
            )
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.paths)) if self.shuffle else np.arange(len(self.paths))
        for index in order[slot::slots]:
            stats = ReadStats()
            examples = list(iter_examples([self.paths[index]], stats))
            self._counts[worker_id] += stats.as_tensor()
            for j in rng.permutation(len(examples)) if self.shuffle else range(len(examples)):
                yield example_to_tensors(examples[j])


class ShapeEditDataset(Dataset):
    """Examples generated on the fly: item ``i`` is ``generate_example(start_seed + i, split)``.

    No disk needed; generation takes a few milliseconds per clip.
    """

    def __init__(self, length: int, split: str = "train", start_seed: int = 0, config: ShapeEditConfig | None = None):
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        self.length = length
        self.split = split
        self.start_seed = start_seed
        self.config = ShapeEditConfig() if config is None else config

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return example_to_tensors(generate_example(self.start_seed + index, self.split, config=self.config))
