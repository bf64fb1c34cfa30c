"""Reading and writing videos with the ffmpeg binary that imageio-ffmpeg ships.

`probe_video` reads a file's frame rate, size, duration and whether it has audio. `iter_video_frames`
decodes RGB uint8 frames one at a time (optionally resampled to another frame rate by ffmpeg and
limited to a time range), so a long or large clip is never held in memory whole; `read_video`
collects them for short clips. `VideoWriter` encodes frames one at a time to H.264 mp4 (yuv420p)
in a temporary file in the target folder, optionally muxes in an audio track, and renames the
result into place, so a failed write never leaves a partial or clobbered file; `write_video`
writes a whole array with it.
"""

from __future__ import annotations

import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import publish_file, temporary_path
from ..errors import LIVEditorError, require

READABLE_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif")
WRITABLE_EXTENSIONS = (".mp4",)
FALLBACK_FPS = 16.0  # for containers that state no frame rate


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


@dataclass(frozen=True)
class VideoInfo:
    """What a video file says about itself (nothing is decoded)."""

    path: Path
    fps: float
    height: int
    width: int
    duration: float  # seconds; 0.0 when the container does not say
    has_audio: bool


@dataclass(frozen=True)
class AudioSource:
    """The audio track to copy into a written video: from `path`, `duration` seconds from `start`."""

    path: Path
    start: float = 0.0
    duration: float | None = None


def _ffmpeg():
    return require("imageio_ffmpeg")


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


def _decode_error(path, exc) -> LIVEditorError:
    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return LIVEditorError(f"cannot decode {path} as a video (no readable video frames): {reason}")


def _check_time_range(start: float, duration: float | None) -> None:
    if not (math.isfinite(start) and start >= 0):
        raise LIVEditorError(f"start must be a finite number of seconds >= 0, got {start}")
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        raise LIVEditorError(f"duration must be a finite number of seconds > 0, got {duration}")


def probe_video(path) -> VideoInfo:
    """Frame rate, size, duration and audio presence of a video file, from its header."""
    path = check_readable_video_path(path)
    reader = _ffmpeg().read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(reader)
        width, height = meta["size"]
    except (RuntimeError, OSError, StopIteration, KeyError, ValueError) as exc:
        raise _decode_error(path, exc) from exc
    finally:
        reader.close()  # stops the ffmpeg process on every path, errors included
    fps = float(meta.get("fps") or 0.0)
    duration = float(meta.get("duration") or 0.0)
    return VideoInfo(path, fps if fps > 0 else FALLBACK_FPS, int(height), int(width),
                     duration if math.isfinite(duration) else 0.0, bool(meta.get("audio_codec")))


def iter_video_frames(path, fps: float | None = None, start: float = 0.0, duration: float | None = None):
    """Yield a video's RGB uint8 `[H, W, 3]` frames one at a time.

    Args:
        fps: resample to this frame rate (ffmpeg's fps filter: frames are dropped or repeated so
            that the clip keeps its duration); None keeps the file's frames.
        start, duration: decode only this time range (seconds).

    Raises:
        LIVEditorError: missing, empty, unreadable or non-video file, or no frames in the range.
    """
    path = check_readable_video_path(path)
    _check_time_range(start, duration)
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be positive, got {fps}")
    input_params = (["-ss", f"{start:.6f}"] if start > 0 else []) + (["-t", f"{duration:.6f}"] if duration else [])
    output_params = ["-vf", f"fps={fps:.6f}"] if fps is not None else []
    reader = _ffmpeg().read_frames(str(path), pix_fmt="rgb24", input_params=input_params, output_params=output_params)
    count = 0
    try:
        try:
            meta = next(reader)
            width, height = meta["size"]
        except (RuntimeError, OSError, StopIteration, KeyError, ValueError) as exc:
            raise _decode_error(path, exc) from exc
        while True:
            try:
                raw = next(reader)
            except StopIteration:
                break
            except (RuntimeError, OSError, ValueError) as exc:
                raise _decode_error(path, exc) from exc
            count += 1
            yield np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3).copy()  # writable, for torch
    finally:
        reader.close()
    if count == 0:
        where = f" from {start:g} s" if start > 0 else ""
        raise LIVEditorError(f"input video {path} has no frames{where}")


def read_video(path, max_frames: int | None = None, fps: float | None = None, start: float = 0.0,
               duration: float | None = None) -> Video:
    """Decode a (short) video file into RGB uint8 frames `[F, H, W, 3]`.

    Args:
        max_frames: stop after this many frames (None: all).
        fps, start, duration: as in `iter_video_frames`.
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    info = probe_video(path)
    frames = []
    for frame in iter_video_frames(path, fps=fps, start=start, duration=duration):
        frames.append(frame)
        if max_frames is not None and len(frames) >= max_frames:
            break
    return Video(frames=np.stack(frames), fps=float(fps) if fps is not None else info.fps)


def check_writable_video_path(path, overwrite: bool = False) -> Path:
    """Raise a one-line LIVEditorError unless a video can be written at `path`."""
    path = Path(path)
    if path.suffix.lower() not in WRITABLE_EXTENSIONS:
        raise LIVEditorError(f"output {path} must end in .mp4 (H.264), got {path.suffix or 'no extension'!r}")
    if path.is_dir():
        raise LIVEditorError(f"output {path} is a directory")
    if path.exists() and not overwrite:
        raise LIVEditorError(f"output {path} already exists; choose another name or pass --overwrite to replace it")
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


class VideoWriter:
    """Encode frames one at a time to an H.264 mp4 at `path`, atomically.

        with VideoWriter(path, fps=16, size=(h, w), audio=AudioSource(input_path)) as writer:
            writer.write(frames)          # [F, H, W, 3] uint8 or float in [0, 1], any F

    The file appears at `path` only when the block ends without an error. With `audio`, the
    source's audio track (if it has one) is copied in, cut to the given time range.
    Height and width must be even (yuv420p).
    """

    def __init__(self, path, fps: float, size: tuple[int, int], overwrite: bool = False, crf: int = 18,
                 audio: AudioSource | None = None):
        self.path = check_writable_video_path(path, overwrite)
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be positive, got {fps}")
        height, width = size
        if height % 2 or width % 2:
            raise ValueError(f"H.264 yuv420p needs even frame sizes, got {height}x{width}")
        self.fps, self.size, self.crf, self.audio = float(fps), (int(height), int(width)), crf, audio
        self.num_frames = 0
        self.audio_copied = False
        self._tmp = None
        self._writer = None

    def __enter__(self):
        height, width = self.size
        self._tmp = temporary_path(self.path, suffix=".mp4")
        self._writer = _ffmpeg().write_frames(
            self._tmp, (width, height), fps=self.fps, codec="libx264", pix_fmt_out="yuv420p", quality=None,
            macro_block_size=1, output_params=["-crf", str(self.crf)],
        )
        self._writer.send(None)
        return self

    def write(self, frames) -> None:
        frames = to_uint8_frames(frames)
        if frames.shape[1:3] != self.size:
            raise ValueError(f"frames are {frames.shape[1]}x{frames.shape[2]}, the video is {self.size[0]}x{self.size[1]}")
        for frame in frames:
            self._writer.send(np.ascontiguousarray(frame))
        self.num_frames += frames.shape[0]

    def __exit__(self, exc_type, exc, tb):
        tmp, muxed = self._tmp, None
        try:
            self._writer.close()
            if exc_type is None:
                if self.num_frames == 0:
                    raise ValueError("frames are empty (0 frames)")
                if self.audio is not None and probe_video(self.audio.path).has_audio:
                    muxed = temporary_path(self.path, suffix=".mp4")
                    _mux_audio(tmp, self.audio, muxed)
                    os.unlink(tmp)
                    tmp, self.audio_copied = muxed, True
                publish_file(tmp, self.path)
        finally:
            for leftover in (tmp, muxed):
                if leftover and os.path.exists(leftover) and leftover != str(self.path):
                    os.unlink(leftover)
        return False


def _mux_audio(video_path: str, audio: AudioSource, out_path: str) -> None:
    """Copy `video_path`'s video stream and `audio`'s (cut, re-encoded as AAC) into `out_path`."""
    cut = (["-ss", f"{audio.start:.6f}"] if audio.start > 0 else []) + (
        ["-t", f"{audio.duration:.6f}"] if audio.duration else [])
    cmd = [_ffmpeg().get_ffmpeg_exe(), "-y", "-loglevel", "error", "-i", video_path, *cut, "-i", str(audio.path),
           "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac", "-shortest", "-f", "mp4", out_path]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
        raise LIVEditorError(f"cannot copy the audio of {audio.path} into the output: {reason}")


def write_video(path, frames, fps: float, overwrite: bool = False, crf: int = 18,
                audio: AudioSource | None = None) -> Path:
    """Write frames as an H.264 mp4 at `fps`, atomically (temporary file, then rename).

    frames: `[F, H, W, 3]` uint8, or float in [0, 1]. Height and width must be even (yuv420p).
    """
    check_writable_video_path(path, overwrite)
    frames = to_uint8_frames(frames)
    with VideoWriter(path, fps, frames.shape[1:3], overwrite=overwrite, crf=crf, audio=audio) as writer:
        writer.write(frames)
    return writer.path
