"""Writes that never leave a half-written file or clobber the old one on failure.

Everything is written to a temporary file in the destination's folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def publish_file(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give a finished temporary file ordinary permissions (mkstemp makes it private) and rename it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
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
