import os
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest

from liveditor.data.video_io import read_video, to_uint8_frames, write_video
from liveditor.errors import LIVEditorError


def _smooth_frames(n, height, width, seed=0):
    """Random but smooth frames (compression keeps them close): random gradients per channel."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    frames = []
    for f in range(n):
        a, b, c = rng.uniform(-1, 1, (3, 3))
        chans = [np.clip(128 + 100 * (a[i] * xx + b[i] * yy + 0.3 * c[i]), 0, 255) for i in range(3)]
        frames.append(np.stack(chans, -1))
    return np.stack(frames).astype(np.uint8)


def _ffmpeg_write(path, frames, fps, codec):
    writer = imageio_ffmpeg.write_frames(str(path), (frames.shape[2], frames.shape[1]), fps=fps, codec=codec,
                                         macro_block_size=1, ffmpeg_log_level="error")
    writer.send(None)
    for frame in frames:
        writer.send(frame)
    writer.close()


def test_mp4_round_trip_keeps_frames_size_and_fps(tmp_path):
    frames = _smooth_frames(7, 48, 80)
    out = write_video(tmp_path / "clip.mp4", frames, fps=12)
    video = read_video(out)
    assert video.frames.shape == frames.shape and video.frames.dtype == np.uint8
    assert video.fps == pytest.approx(12)
    assert np.abs(video.frames.astype(int) - frames).mean() < 4
    assert read_video(out, max_frames=3).num_frames == 3
    # Only the video is left behind, no temporary file.
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4"]


def test_written_mp4_is_h264(tmp_path):
    out = write_video(tmp_path / "clip.mp4", _smooth_frames(3, 32, 32), fps=16)
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(out)],
                           capture_output=True, text=True)
    assert "h264" in probe.stderr and "16 fps" in probe.stderr


@pytest.mark.parametrize("ext,codec", [(".mov", "libx264"), (".webm", "libvpx-vp9"), (".mkv", "libx264")])
def test_reads_other_containers(tmp_path, ext, codec):
    frames = _smooth_frames(5, 32, 48, seed=3)
    _ffmpeg_write(tmp_path / f"v{ext}", frames, 8, codec)
    video = read_video(tmp_path / f"v{ext}")
    assert video.frames.shape == frames.shape and video.fps == pytest.approx(8)
    assert np.abs(video.frames.astype(int) - frames).mean() < 8


def test_reads_gif(tmp_path):
    import imageio.v3 as iio

    frames = _smooth_frames(4, 30, 40, seed=5)
    iio.imwrite(tmp_path / "a.gif", frames, duration=100, loop=0)
    video = read_video(tmp_path / "a.gif")
    assert video.frames.shape == frames.shape
    assert video.fps == pytest.approx(10)


def test_float_frames_are_scaled_and_clipped():
    frames = np.random.default_rng(1).uniform(-0.2, 1.2, (2, 4, 6, 3)).astype(np.float32)
    out = to_uint8_frames(frames)
    assert out.dtype == np.uint8
    expected = (np.clip(frames, 0, 1) * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(out, expected)


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(LIVEditorError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(LIVEditorError, match="empty"):
        read_video(tmp_path / "empty.mp4")
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 20)
    with pytest.raises(LIVEditorError, match="cannot decode"):
        read_video(tmp_path / "text.mp4")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LIVEditorError, match="unsupported extension"):
        read_video(tmp_path / "notes.txt")
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(LIVEditorError, match="not a file"):
        read_video(tmp_path / "dir.mp4")
    # A container holding audio only: no video frames.
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    "anullsrc=r=8000:cl=mono", "-t", "0.2", "-c:a", "aac", str(tmp_path / "audio.mp4")], check=True)
    with pytest.raises(LIVEditorError, match="no readable video frames"):
        read_video(tmp_path / "audio.mp4")


def test_write_never_clobbers_and_is_atomic(tmp_path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"precious")
    with pytest.raises(LIVEditorError, match="already exists"):
        write_video(target, _smooth_frames(2, 16, 16), fps=8)
    assert target.read_bytes() == b"precious"
    # A failing write (odd size for yuv420p) leaves the old file and no temporary behind.
    with pytest.raises(ValueError, match="even"):
        write_video(target, _smooth_frames(2, 15, 16), fps=8, overwrite=True)
    assert target.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["out.mp4"]
    write_video(target, _smooth_frames(2, 16, 16), fps=8, overwrite=True)
    assert read_video(target).num_frames == 2
    with pytest.raises(LIVEditorError, match="must end in .mp4"):
        write_video(tmp_path / "out.avi", _smooth_frames(2, 16, 16), fps=8)
    with pytest.raises(LIVEditorError, match="does not exist"):
        write_video(tmp_path / "nowhere" / "out.mp4", _smooth_frames(2, 16, 16), fps=8)
    with pytest.raises(ValueError, match="0 frames"):
        write_video(tmp_path / "zero.mp4", np.zeros((0, 16, 16, 3), np.uint8), fps=8)


def _clip_with_audio(path, seconds, fps, size="96x64"):
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    f"testsrc=size={size}:rate={fps}", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000",
                    "-t", str(seconds), "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest",
                    str(path)], check=True)
    return path


def test_probe_and_resampled_ranged_decoding(tmp_path):
    from liveditor.data.video_io import iter_video_frames, probe_video

    path = _clip_with_audio(tmp_path / "a.mp4", 2, 30)
    info = probe_video(path)
    assert (info.fps, info.height, info.width, info.has_audio) == (30, 64, 96, True)
    assert info.duration == pytest.approx(2.0, abs=0.05)
    assert not probe_video(write_video(tmp_path / "silent.mp4", _smooth_frames(3, 16, 16), fps=8)).has_audio
    # Resampled to 16 fps the 2 s clip keeps its duration: 32 frames; a range keeps its length too.
    assert sum(1 for _ in iter_video_frames(path, fps=16)) == 32
    assert sum(1 for _ in iter_video_frames(path, fps=16, start=0.5, duration=1.0)) == 16
    assert read_video(path, fps=8).frames.shape == (16, 64, 96, 3)
    with pytest.raises(LIVEditorError, match="no frames from 5 s"):
        next(iter_video_frames(path, start=5.0))


def test_frames_are_decoded_lazily(tmp_path, monkeypatch):
    """Frames are pulled from ffmpeg one at a time: taking the first frame of a long clip reads one
    frame, and closing the iterator stops the decoder."""
    from liveditor.data.video_io import iter_video_frames

    pulled = []
    real = imageio_ffmpeg.read_frames

    def counting(*args, **kwargs):
        for item in real(*args, **kwargs):
            pulled.append(1)
            yield item

    monkeypatch.setattr(imageio_ffmpeg, "read_frames", counting)
    path = _clip_with_audio(tmp_path / "long.mp4", 20, 25, size="640x360")
    frames = iter_video_frames(path)
    first = next(frames)
    frames.close()
    assert first.shape == (360, 640, 3) and first.flags.writeable
    assert len(pulled) == 2  # the header and one frame, of 500
    pulled.clear()
    assert sum(1 for _ in iter_video_frames(path, fps=1)) == 20 and len(pulled) == 21


def test_writer_streams_frames_and_copies_the_audio_range(tmp_path):
    from liveditor.data.video_io import AudioSource, VideoWriter, probe_video

    source = _clip_with_audio(tmp_path / "src.mp4", 3, 10)
    target = tmp_path / "out.mp4"
    with VideoWriter(target, fps=8, size=(32, 48), audio=AudioSource(source, start=1.0, duration=1.0)) as writer:
        for seed in range(4):
            writer.write(_smooth_frames(2, 32, 48, seed=seed))
        assert not target.exists()  # nothing appears before the end
    info = probe_video(target)
    assert writer.num_frames == 8 and writer.audio_copied and info.has_audio
    assert info.duration == pytest.approx(1.0, abs=0.1)
    assert sorted(os.listdir(tmp_path)) == ["out.mp4", "src.mp4"]
    # A failure inside the block leaves neither a file nor a temporary behind.
    with pytest.raises(RuntimeError, match="stop"):
        with VideoWriter(tmp_path / "failed.mp4", fps=8, size=(32, 48)) as writer:
            writer.write(_smooth_frames(2, 32, 48))
            raise RuntimeError("stop")
    assert sorted(os.listdir(tmp_path)) == ["out.mp4", "src.mp4"]
