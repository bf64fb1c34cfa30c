import os

import numpy as np
import pytest

from liveditor.cli import main as cli_main
from liveditor.data.video_io import read_video, write_video
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
    assert video.frames.shape == (5, 64, 64, 3) and video.fps == pytest.approx(16)
    stdout = capsys.readouterr().out
    assert "total" in stdout and "% of the edit" in stdout and "attention (isa)" in stdout

    dense_out = tmp_path / "dense.mp4"
    assert _edit(input_video, "make the ball blue", "-o", dense_out, "--model", model_folder, "--steps", "2",
                 "--attention", "dense", "--guidance", "1.0") == 0
    assert "attention (dense)" in capsys.readouterr().out
    assert read_video(dense_out).num_frames == 5


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
    _assert_fails(capsys, "already exists", input_video, "x", *common)
    assert out.read_bytes() == b"keep me"
    _assert_fails(capsys, "is the input video", input_video, "x", "-o", input_video, "--model", model_folder,
                  "--overwrite")
    assert read_video(input_video).num_frames == 6
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["out.mp4", "input.mp4", "empty.mp4", "fake.mp4", "notes.txt", "broken-model"])


def test_debug_shows_the_traceback(tmp_path, model_folder, input_video):
    with pytest.raises(Exception, match="instruction is empty"):
        cli_main(["--debug", "edit", str(input_video), "", "-o", str(tmp_path / "o.mp4"), "--model", str(model_folder)])


def test_bundled_model_warns_on_out_of_domain_instruction(tmp_path, capsys):
    from liveditor.demo import example_input_path

    out = tmp_path / "edit.mp4"
    assert cli_main(["edit", str(example_input_path()), "paint a photorealistic dragon", "-o", str(out), "--steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "outside the ShapeEdit domain" in err and "dragon" in err
    assert out.stat().st_size > 0 and (out.stat().st_mode & 0o044)  # readable by others, as any new file
