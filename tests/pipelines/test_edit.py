"""run_edit: long inputs in overlapping windows, frame-rate resampling, time ranges, padding, audio."""

import subprocess

import imageio_ffmpeg
import numpy as np
import pytest

from liveditor.data.shapes import generate_example
from liveditor.data.video_io import probe_video, read_video, write_video
from liveditor.pipelines.edit import WindowBlender, iter_windows, run_edit, shapeedit_video_check
from tiny_models import tiny_pipeline


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    pipe = tiny_pipeline(seed=0)  # 16 fps, window 17 frames, temporal factor 4, buckets 64x64 / 64x96 / 96x64
    pipe.register_to_config(default_num_inference_steps=1, default_guidance_scale=1.0)
    pipe.save_pretrained(path)
    return path


def _smooth_clip(n, height, width, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    frames = []
    for f in range(n):
        a, b = rng.uniform(-1, 1, (2, 3))
        frames.append(np.stack([128 + 100 * (a[c] * xx + b[c] * yy) for c in range(3)], -1))
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("count,starts", [(3, [0]), (4, [0]), (10, [0, 3, 6]), (11, [0, 3, 6, 7]), (12, [0, 3, 6, 8])])
def test_windows_cover_every_frame_and_the_last_one_is_full(count, starts):
    windows = list(iter_windows(iter(range(count)), window=4, overlap=1))
    covered = set()
    for start, frames in windows:
        assert frames == list(range(start, start + len(frames))), (count, windows)
        assert len(frames) == min(4, count)
        covered.update(frames)
    assert covered == set(range(count))
    assert [s for s, _ in windows] == starts


def test_blender_crossfades_overlaps_and_measures_the_seam():
    written = []
    blender = WindowBlender(lambda frames: written.append(frames))
    first, second = np.full((4, 2, 2, 3), 0.2, np.float32), np.full((4, 2, 2, 3), 0.6, np.float32)
    blender.add(0, first)
    blender.add(2, second)  # frames 2 and 3 overlap
    blender.finish()
    out = np.concatenate(written)
    assert out.shape[0] == 6
    np.testing.assert_allclose(out[:, 0, 0, 0], [0.2, 0.2, 0.2 + 0.4 / 3, 0.2 + 0.8 / 3, 0.6, 0.6], atol=1e-6)
    assert blender.seam_difference == pytest.approx(0.4 * 255)


def test_shapeedit_video_check():
    assert shapeedit_video_check(generate_example(3, "test").source) is None
    noise = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    assert "does not look like the ShapeEdit domain" in shapeedit_video_check(noise)
    pattern = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=8",
         "-frames:v", "8", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    assert shapeedit_video_check(np.frombuffer(pattern, np.uint8).reshape(8, 64, 64, 3)) is not None


def test_long_input_is_edited_in_windows_at_the_model_fps(model_folder, tmp_path):
    path = write_video(tmp_path / "in.mp4", _smooth_clip(48, 64, 64, seed=1), fps=24)  # 2 s
    steps = []
    report = run_edit(path, "make it red", tmp_path / "out.mp4", model=model_folder, seed=3, print_summary=False,
                      callback_on_step_end=lambda pipe, i, t, kwargs: steps.append(i) or {})
    out = read_video(report.output)
    assert out.fps == pytest.approx(16) and out.num_frames == 32 == report.num_frames  # 2 s at 16 fps
    assert (report.window, report.overlap, report.windows) == (17, 4, 3)  # [0, 17), [13, 30), [15, 32)
    assert report.seam_difference is not None and report.input_seconds == pytest.approx(2.0)
    assert steps == [0, 0, 0]  # one step in each of the three windows
    # A part of the input: 1 s from 0.5 s; a smaller window.
    part = run_edit(path, "make it red", tmp_path / "part.mp4", model=model_folder, start=0.5, duration=1.0,
                    window=9, print_summary=False)
    assert part.num_frames == 16 and (part.window, part.windows) == (9, 2)


def test_pad_mode_keeps_the_whole_frame_and_audio_is_copied(model_folder, tmp_path):
    silent = write_video(tmp_path / "silent.mp4", _smooth_clip(8, 48, 96, seed=2), fps=16)
    with_audio = tmp_path / "audio.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(silent), "-f", "lavfi",
                    "-i", "sine=frequency=330:sample_rate=16000", "-t", "0.5", "-c:v", "copy", "-c:a", "aac",
                    "-shortest", str(with_audio)], check=True)
    report = run_edit(with_audio, "x", tmp_path / "out.mp4", model=model_folder, resize="pad", print_summary=False)
    assert (report.height, report.width) == (48, 96) and "padded" in report.fit
    assert report.audio_copied and probe_video(report.output).has_audio
    assert read_video(report.output).frames.shape == (8, 48, 96, 3)
    cropped = run_edit(silent, "x", tmp_path / "crop.mp4", model=model_folder, print_summary=False)
    assert (cropped.height, cropped.width) == (64, 96) and not cropped.audio_copied
