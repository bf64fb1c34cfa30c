import json

import numpy as np
import pytest

from liveditor.cli import main
from liveditor.data.shapes import ShapeEditConfig, generate_example
from liveditor.data.video_io import read_video
from liveditor.demo import OUTPUT_FILES, run_demo, side_by_side
from liveditor.errors import LIVEditorError
from liveditor.pipelines.loading import default_model_path


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from liveditor.models.tiny_codec import SpaceToDepthVideoCodec
    from liveditor.pipelines.pipeline_liveditor import LIVEditorPipeline
    from tiny_models import tiny_components

    codec = SpaceToDepthVideoCodec(scale_factor_spatial=8)
    z = codec.config.z_dim
    components = tiny_components(resolution_buckets=((32, 32),), in_channels=z, out_channels=z)
    components["vae"] = codec
    folder = tmp_path_factory.mktemp("model") / "tiny"
    LIVEditorPipeline(**components).save_pretrained(folder)
    return folder


def test_demo_writes_input_edit_and_side_by_side(model_folder, tmp_path):
    out = tmp_path / "demo"
    result = run_demo(out, seed=7, model=model_folder, steps=2, print_fn=None)
    expected = generate_example(7, "test", config=ShapeEditConfig(height=32, width=32))
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    record = json.loads((out / "demo.json").read_text())
    assert record["instruction"] == expected.instruction == result.instruction
    assert record["family"] == expected.family and record["psnr"] == result.psnr
    assert record["total_seconds"] >= record["seconds"] > 0
    clip = read_video(out / "input.mp4")
    assert clip.frames.shape == expected.source.shape
    assert np.abs(clip.frames.astype(int) - expected.source).mean() < 12  # H.264 of the generated clip
    assert read_video(out / "edit.mp4").frames.shape == expected.source.shape
    assert read_video(out / "side_by_side.mp4").frames.shape == (16, 32 * 4, 3 * 32 * 4 + 2 * 4, 3)

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(LIVEditorError, match="exists"):
        run_demo(out, seed=8, model=model_folder, steps=1, print_fn=None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    run_demo(out, seed=8, model=model_folder, steps=1, overwrite=True, print_fn=None)
    assert json.loads((out / "demo.json").read_text())["seed"] == 8


@pytest.mark.parametrize("answer", ["target", "source"])
def test_demo_scores_the_edit_against_the_ground_truth(model_folder, tmp_path, monkeypatch, answer):
    """With a stand-in model that returns the exact target (or the unedited source), the recorded
    scores are those of that video against the ground truth."""
    from liveditor.eval.metrics import psnr
    from liveditor.pipelines.pipeline_liveditor import LIVEditorPipeline, LIVEditorPipelineOutput

    expected = generate_example(11, "test", config=ShapeEditConfig(height=32, width=32))
    video = getattr(expected, answer)
    monkeypatch.setattr(LIVEditorPipeline, "__call__",
                        lambda self, *a, **k: LIVEditorPipelineOutput(frames=video[None] / 255.0, fps=8.0))
    result = run_demo(tmp_path / answer, seed=11, model=model_folder, steps=1, print_fn=None)
    record = json.loads((tmp_path / answer / "demo.json").read_text())
    assert record["psnr"] == pytest.approx(psnr(video, expected.target))
    assert record["success"] is (answer == "target") and result.success is (answer == "target")


def test_demo_cli(model_folder, tmp_path, capsys, monkeypatch):
    assert main(["demo", "-o", str(tmp_path / "d"), "--model", str(model_folder), "--steps", "1", "--family", "remove",
                 "--seed", "-1"]) == 0
    printed = capsys.readouterr().out
    assert "remove" in printed and "side_by_side.mp4" in printed and "total" in printed and "(edit " in printed
    seed = json.loads((tmp_path / "d" / "demo.json").read_text())["seed"]
    assert seed >= 0 and f"seed {seed}," in printed  # -1: a random seed, reported
    assert main(["demo", "-o", str(tmp_path / "e"), "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    # A failure half-way through writing (after input.mp4 and edit.mp4) removes the folder it created.
    def fail(*videos, **kwargs):
        raise LIVEditorError("cannot lay out the side-by-side view")

    monkeypatch.setattr("liveditor.demo.side_by_side", fail)
    assert main(["demo", "-o", str(tmp_path / "f"), "--model", str(model_folder), "--steps", "1"]) == 2
    assert "side-by-side" in capsys.readouterr().err and not (tmp_path / "f").exists()
    (tmp_path / "g").mkdir()  # a folder the user made is kept
    assert main(["demo", "-o", str(tmp_path / "g"), "--model", str(model_folder), "--steps", "1"]) == 2
    assert (tmp_path / "g").is_dir()


def test_side_by_side_layout():
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (2, 3, 5, 3), dtype=np.uint8) for _ in range(2))
    view = side_by_side(a, b, scale=2, gap=1)
    assert view.shape == (2, 6, 21, 3)
    assert np.array_equal(view[:, ::2, 0:10:2], a) and np.array_equal(view[:, ::2, 11::2], b)
    assert np.all(view[:, :, 10] == 255)


@pytest.mark.skipif(not default_model_path().exists(), reason="bundled tiny model not built yet")
def test_demo_runs_on_the_bundled_model(tmp_path):
    result = run_demo(tmp_path / "bundled", seed=1, steps=1, print_fn=None)
    assert result.instruction and (tmp_path / "bundled" / "side_by_side.mp4").exists()


def test_bundled_example_input_and_its_instructions():
    import re

    from liveditor.data.shapes import check_instruction
    from liveditor.demo import example_input_path

    path = example_input_path()
    clip = read_video(path)
    source = generate_example(1030, "test", "recolor").source
    assert clip.frames.shape == source.shape and np.abs(clip.frames.astype(int) - source).mean() < 8
    instructions = re.findall(r'liveditor edit shapes\.mp4 "([^"]+)"', (path.parent / "README.md").read_text())
    assert len(instructions) >= 5
    for text in instructions:
        assert check_instruction(text).in_domain, text
