"""Reading and writing videos with the ffmpeg binary that imageio-ffmpeg ships.

`read_video` takes mp4, mov, webm, mkv, avi and gif and returns RGB uint8 frames `[F, H, W, 3]`
with the frame rate. `write_video` writes H.264 mp4 (yuv420p) to a temporary file in the target
folder and renames it into place, so a failed write never leaves a partial or clobbered file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import publish_file, temporary_path
from ..errors import LIVEditorError

READABLE_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif")
WRITABLE_EXTENSIONS = (".mp4",)


@dataclass
class Video:
    """Decoded video: `frames` uint8 `[F, H, W, 3]` RGB, `fps` frames per second."""

    frames: np.ndarray
    fps: float

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])


def _ffmpeg():
    try:
        import imageio_ffmpeg
    except ImportError as exc:  # pragma: no cover - declared dependency of the editor extra
        raise LIVEditorError("video I/O needs imageio-ffmpeg: pip install 'liveditor[editor]'") from exc
    return imageio_ffmpeg


def check_readable_video_path(path) -> Path:
    """Raise a one-line LIVEditorError unless `path` names an existing, non-empty file of a video type."""
    path = Path(path)
    if not path.exists():
        raise LIVEditorError(f"input video {path} does not exist")
    if not path.is_file():
        raise LIVEditorError(f"input video {path} is not a file")
    if path.suffix.lower() not in READABLE_EXTENSIONS:
        raise LIVEditorError(
            f"input {path} has unsupported extension {path.suffix or '(none)'!r}; "
            f"supported: {', '.join(READABLE_EXTENSIONS)}"
        )
    if path.stat().st_size == 0:
        raise LIVEditorError(f"input video {path} is empty (0 bytes)")
    if not os.access(path, os.R_OK):
        raise LIVEditorError(f"input video {path} is not readable (permission denied)")
    return path


def read_video(path, max_frames: int | None = None) -> Video:
    """Decode a video file into RGB uint8 frames.

    Args:
        path: an mp4/mov/webm/mkv/avi/gif file.
        max_frames: stop after this many frames (None: all).

    Raises:
        LIVEditorError: missing, empty, unreadable or non-video file, or a video without frames.
    """
    path = check_readable_video_path(path)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    ffmpeg = _ffmpeg()
    frames = []
    reader = ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(reader)
        width, height = meta["size"]
        fps = float(meta.get("fps") or 0.0)
        for raw in reader:
            frames.append(np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3))
            if max_frames is not None and len(frames) >= max_frames:
                break
    except (RuntimeError, OSError, StopIteration, KeyError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise LIVEditorError(f"cannot decode {path} as a video (no readable video frames): {reason}") from exc
    finally:
        reader.close()  # stops the ffmpeg process on every path, errors included
    if not frames:
        raise LIVEditorError(f"input video {path} has no frames")
    if not fps > 0:
        fps = 16.0
    return Video(frames=np.stack(frames), fps=fps)


def check_writable_video_path(path, overwrite: bool = False) -> Path:
    """Raise a one-line LIVEditorError unless a video can be written at `path`."""
    path = Path(path)
    if path.suffix.lower() not in WRITABLE_EXTENSIONS:
        raise LIVEditorError(f"output {path} must end in .mp4 (H.264), got {path.suffix or 'no extension'!r}")
    if path.is_dir():
        raise LIVEditorError(f"output {path} is a directory")
    if path.exists() and not overwrite:
        raise LIVEditorError(f"output {path} already exists; choose another name or allow overwriting")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise LIVEditorError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise LIVEditorError(f"output folder {parent} is not writable")
    return path


def to_uint8_frames(frames) -> np.ndarray:
    """`[F, H, W, 3]` uint8 from uint8 or float-in-[0, 1] frames (numpy or torch, or a list of PIL images)."""
    if isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(f.convert("RGB") if hasattr(f, "convert") else f) for f in frames])
    if hasattr(frames, "detach"):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got shape {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("frames are empty (0 frames)")
    if frames.dtype == np.uint8:
        return frames
    if not np.issubdtype(frames.dtype, np.floating):
        raise ValueError(f"frames must be uint8 or float in [0, 1], got {frames.dtype}")
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_video(path, frames, fps: float, overwrite: bool = False, crf: int = 18) -> Path:
    """Write frames as an H.264 mp4 at `fps`, atomically (temporary file, then rename).

    frames: `[F, H, W, 3]` uint8, or float in [0, 1]. Height and width must be even (yuv420p).
    """
    path = check_writable_video_path(path, overwrite)
    frames = to_uint8_frames(frames)
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs even frame sizes, got {height}x{width}")
    ffmpeg = _ffmpeg()
    tmp = temporary_path(path, suffix=".mp4")
    try:
        writer = ffmpeg.write_frames(
            tmp,
            (width, height),
            fps=float(fps),
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=None,
            macro_block_size=1,
            output_params=["-crf", str(crf)],
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        publish_file(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
