import os
import re

import numpy as np
import pytest

from liveditor.cli import main as cli_main
from liveditor.data.video_io import read_video, write_video
from python_process import run_python
from tiny_models import tiny_pipeline


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_pipeline(seed=0).save_pretrained(path)
    return path


@pytest.fixture()
def input_video(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (6, 48, 48, 3), dtype=np.uint8)
    return write_video(tmp_path / "input.mp4", frames, fps=24)


def _edit(*args):
    return cli_main(["edit", *map(str, args)])


def test_edit_writes_video_and_reports_attention_share(tmp_path, model_folder, input_video, capsys):
    out = tmp_path / "edited.mp4"
    rc = _edit(input_video, "make the ball blue", "-o", out, "--model", model_folder, "--steps", "2",
               "--seed", "3", "--device", "cpu")
    assert rc == 0
    video = read_video(out)
    # 6 frames at 24 fps = 0.25 s -> 4 frames at the model's 16 fps: the duration is kept.
    assert video.frames.shape == (4, 64, 64, 3) and video.fps == pytest.approx(16)
    stdout = capsys.readouterr().out
    assert "total" in stdout and "% of the edit" in stdout and "attention (isa)" in stdout
    assert "0.25 s at 16 fps; input 0.25 s at 24 fps, 48x48" in stdout and "bucket 64x64" in stdout
    assert "seed 3" in stdout

    dense_out = tmp_path / "dense.mp4"
    assert _edit(input_video, "make the ball blue", "-o", dense_out, "--model", model_folder, "--steps", "2",
                 "--attention", "dense", "--guidance", "1.0", "--seed", "-1") == 0
    stdout = capsys.readouterr().out
    assert "attention (dense)" in stdout
    assert int(re.search(r"; seed (\d+)\n", stdout).group(1)) >= 0  # -1: a random seed, printed
    assert read_video(dense_out).num_frames == 4


def _assert_fails(capsys, fragment, *args):
    rc = _edit(*args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert fragment in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_inputs_fail_with_one_line_and_write_nothing(tmp_path, model_folder, input_video, capsys, monkeypatch):
    out = tmp_path / "out.mp4"
    common = ["-o", out, "--model", model_folder, "--steps", "1"]
    _assert_fails(capsys, "instruction is empty", input_video, "  ", *common)
    _assert_fails(capsys, "does not exist", tmp_path / "nope.mp4", "x", *common)
    (tmp_path / "empty.mp4").write_bytes(b"")
    _assert_fails(capsys, "is empty", tmp_path / "empty.mp4", "x", *common)
    (tmp_path / "fake.mp4").write_text("not a video at all")
    _assert_fails(capsys, "cannot decode", tmp_path / "fake.mp4", "x", *common)
    (tmp_path / "notes.txt").write_text("hi")
    _assert_fails(capsys, "unsupported extension", tmp_path / "notes.txt", "x", *common)
    _assert_fails(capsys, "model folder", input_video, "x", "-o", out, "--model", tmp_path / "no-model")
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text((model_folder / "model_index.json").read_text())
    _assert_fails(capsys, "lacks the tokenizer component", input_video, "x", "-o", out, "--model", broken)
    monkeypatch.setattr("liveditor.pipelines.loading.default_model_path", lambda: tmp_path / "no-bundled-model")
    _assert_fails(capsys, "bundled tiny model is missing", input_video, "x", "-o", out)
    _assert_fails(capsys, "must end in .mp4", input_video, "x", "-o", tmp_path / "out.gif", "--model", model_folder)
    assert not out.exists()

    # An existing output is never overwritten without --overwrite, nor is the input.
    out.write_bytes(b"keep me")
    _assert_fails(capsys, "already exists; choose another name or pass --overwrite", input_video, "x", *common)
    assert out.read_bytes() == b"keep me"
    _assert_fails(capsys, "is the input video", input_video, "x", "-o", input_video, "--model", model_folder,
                  "--overwrite")
    assert read_video(input_video).num_frames == 6
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["out.mp4", "input.mp4", "empty.mp4", "fake.mp4", "notes.txt", "broken-model"])


def test_debug_shows_the_traceback(tmp_path, model_folder, input_video):
    with pytest.raises(Exception, match="instruction is empty"):
        cli_main(["--debug", "edit", str(input_video), "", "-o", str(tmp_path / "o.mp4"), "--model", str(model_folder)])


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path, model_folder, input_video):
    with pytest.raises(Exception, match="instruction is empty"):
        cli_main(["edit", str(input_video), "", "-o", str(tmp_path / "o.mp4"), "--model", str(model_folder), "--debug"])


def test_bundled_model_warns_on_out_of_domain_instruction(tmp_path, capsys):
    from liveditor.demo import example_input_path

    out = tmp_path / "edit.mp4"
    assert cli_main(["edit", str(example_input_path()), "paint a photorealistic dragon", "-o", str(out), "--steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "outside the ShapeEdit domain" in err and "dragon" in err
    assert "does not look like the ShapeEdit domain" not in err  # the example clip is a ShapeEdit clip
    assert out.stat().st_size > 0 and (out.stat().st_mode & 0o044)  # readable by others, as any new file


def test_bundled_model_warns_on_out_of_domain_video(tmp_path, capsys):
    noise = np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    clip = write_video(tmp_path / "noise.mp4", noise, fps=8)
    assert cli_main(["edit", str(clip), "make the red circle blue", "-o", str(tmp_path / "e.mp4"), "--steps", "1",
                     "--attention", "dense"]) == 0
    err = capsys.readouterr().err
    assert err.count("does not look like the ShapeEdit domain") == 1 and "instruction" not in err


PEAK_RSS_SCRIPT = """
import resource, sys
from liveditor.cli import main
rc = main(sys.argv[1:])
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(f"peak_rss_kb {own} {children}")
sys.exit(rc)
"""


@pytest.mark.slow
def test_bundled_model_keeps_duration_and_audio_of_a_long_hd_clip_in_bounded_memory(tmp_path):
    """Issue 8's check: a 10 s, 30 fps, 1280x720 clip with audio, `--steps 1`, the bundled model."""
    import subprocess

    import imageio_ffmpeg

    from liveditor.data.video_io import probe_video

    clip = tmp_path / "hd.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=1280x720:rate=30", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=22050",
                    "-t", "10", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(clip)],
                   check=True)
    out = tmp_path / "edited.mp4"
    result = run_python("-c", PEAK_RSS_SCRIPT, "edit", str(clip), "make the red circle blue", "-o", str(out),
                        "--steps", "1")
    assert result.returncode == 0, result.stderr
    own_kb, children_kb = (int(v) for v in result.stdout.split("peak_rss_kb")[1].split())
    assert own_kb < 2 * 1024 * 1024 and children_kb < 2 * 1024 * 1024, (own_kb, children_kb)
    source, edited = probe_video(clip), probe_video(out)
    assert edited.fps == 8 and edited.has_audio
    assert read_video(out).num_frames == 80
    assert abs(edited.duration - source.duration) <= 1 / edited.fps, (edited.duration, source.duration)
    assert "10.00 s at 8 fps; input 10.00 s at 30 fps, 1280x720" in result.stdout
    assert "audio copied" in result.stdout and "windows of 16 frames" in result.stdout
