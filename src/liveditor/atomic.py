"""Writes that never leave a half-written file or folder, or clobber the old one on failure.

Everything is written to a temporary file (or folder) in the destination's folder and renamed
into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def publish_file(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give a finished temporary file ordinary permissions (mkstemp makes it private) and rename it."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def temporary_path(path: str | os.PathLike, suffix: str = ".tmp") -> str:
    """An empty private file next to ``path``, for a writer that opens files by name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return tmp


@contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        publish_file(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, payload) -> None:
    """Write ``payload`` as indented JSON, atomically; the folder is created if missing."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")


def old_copy(path: str | os.PathLike) -> Path:
    """Where `atomic_directory(..., replace=True)` keeps the previous folder during the swap."""
    path = Path(path)
    return path.with_name(path.name + ".old")


def publish_directory(tmp: str | os.PathLike, path: str | os.PathLike, replace: bool = False) -> None:
    """Rename the finished folder ``tmp`` onto ``path``, swapping out an old one if ``replace``: at
    every moment either ``path`` or ``old_copy(path)`` is a complete folder, and the old one is
    deleted once the new one is in place. Without ``replace`` an existing ``path`` is an error."""
    path = Path(path)
    os.chmod(tmp, 0o777 & ~_umask())
    old = old_copy(path)
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        if not replace:
            raise FileExistsError(f"{path} already exists")
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(path: str | os.PathLike, replace: bool = False):
    """Build a folder in a temporary sibling and publish it onto ``path`` (`publish_directory`)
    only if the block succeeds; on failure the temporary folder is removed and ``path`` is untouched.
    With ``replace=False`` an existing ``path`` is an error (checked before and at the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        publish_directory(tmp, path, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
