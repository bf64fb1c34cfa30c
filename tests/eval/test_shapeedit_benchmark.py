import numpy as np
import pytest

from liveditor.data.shapes import FAMILIES, generate_example
from liveditor.eval.metrics import PSNR_CAP_DB
from liveditor.atomic import write_json
from liveditor.data.video_io import to_uint8_frames
from liveditor.eval.shapeedit import evaluate_shapeedit, format_summary


def _targets(per_family, split="test"):
    examples = [generate_example(s, split, f) for f in FAMILIES for s in range(per_family)]
    return {ex.source.tobytes(): ex.target for ex in examples}


def _each(edit_one):
    """A batch editor from a one-clip editor."""
    return lambda sources, instructions, attention: np.stack(
        [edit_one(s, i, attention) for s, i in zip(sources, instructions)])


def test_oracle_scores_perfectly_and_identity_fails():
    targets = _targets(2)
    calls = []

    def oracle(source, instruction, attention):
        calls.append(attention)
        return targets[source.tobytes()].copy()

    result = evaluate_shapeedit(_each(oracle), per_family=2, progress=False, batch_size=5)
    assert len(result["clips"]) == 2 * len(FAMILIES) and sorted(set(calls)) == ["dense", "isa"]
    assert [(c["family"], c["seed"]) for c in result["clips"]] == [(f, s) for f in FAMILIES for s in range(2)]
    overall = result["summary"]["all"]
    assert overall["isa"]["success_rate"] == overall["dense"]["success_rate"] == 100.0
    assert overall["isa_vs_dense_psnr"] == PSNR_CAP_DB and overall["isa"]["ssim"] == pytest.approx(1.0)
    # Each clip names its edit; motion is also summarised by kind of motion edit.
    assert all(c["edit"] == generate_example(c["seed"], "test", c["family"]).metadata["edit"] for c in result["clips"])
    by_kind = result["motion_by_kind"]
    assert sum(e["clips"] for e in by_kind.values()) == 2
    assert all(e["isa"]["success_rate"] == e["dense"]["success_rate"] == 100.0 for e in by_kind.values())
    assert "motion by kind, success % isa / dense (clips): " in format_summary(result)
    # The oracle puts the moved object exactly where the target has it, in every frame.
    motion = [c for c in result["clips"] if c["family"] == "motion"]
    assert all(set(c["isa"]["position_error_per_frame"]) <= {0.0, None} for c in motion)
    assert all(e["dense"]["position_error_px"] == {"first_half": 0.0, "second_half": 0.0} for e in by_kind.values())
    assert "median object position error px (first -> second half of the frames): " in format_summary(result)
    assert all("position_error_per_frame" not in c["isa"] for c in result["clips"] if c["family"] != "motion")

    nothing = evaluate_shapeedit(lambda s, i, a: s.copy(), per_family=2, attentions=("dense",), progress=False)
    for family in FAMILIES:
        entry = nothing["summary"][family]
        assert entry["dense"]["success_rate"] == 0.0
        assert entry["dense"]["psnr"] == pytest.approx(entry["input_psnr"])
    assert "isa_vs_dense_psnr" not in nothing["summary"]["all"]
    assert all(e["dense"]["success_rate"] == 0.0 for e in nothing["motion_by_kind"].values())
    # Doing nothing leaves the object on its old path: it drifts away from the target's over the clip.
    for entry in nothing["motion_by_kind"].values():
        halves = entry["dense"]["position_error_px"]
        assert halves["second_half"] > halves["first_half"] > 0
    assert "motion_by_kind" not in evaluate_shapeedit(lambda s, i, a: s.copy(), per_family=1, families=("swap",),
                                                      attentions=("isa",), progress=False)


def test_val_split_is_scored_against_its_own_targets():
    targets = _targets(1, "val")
    result = evaluate_shapeedit(_each(lambda s, i, a: targets[s.tobytes()].copy()), per_family=1, split="val",
                                attentions=("isa",), progress=False)
    assert result["settings"]["split"] == "val" and result["summary"]["all"]["isa"]["success_rate"] == 100.0
    with pytest.raises(ValueError, match="split"):
        evaluate_shapeedit(lambda s, i, a: s, split="train", progress=False)


@pytest.mark.parametrize("seed", [0, 1])
def test_isa_vs_dense_psnr_measures_the_difference(tmp_path, seed):
    targets = _targets(1)
    rng = np.random.default_rng(seed)

    def editor(source, instruction, attention):
        out = targets[source.tobytes()].astype(np.int16)
        if attention == "isa":
            out = out + rng.integers(-3, 4, out.shape)
        return np.clip(out, 0, 255).astype(np.uint8)

    result = evaluate_shapeedit(_each(editor), per_family=1, progress=False)
    value = result["summary"]["all"]["isa_vs_dense_psnr"]
    assert 35 < value < 50  # uniform noise of variance 4 is about 42 dB
    table = format_summary(result)
    assert all(f"| {family} |" in table for family in FAMILIES) and "ISA vs dense PSNR" in table
    write_json(tmp_path / "r.json", result)
    assert (tmp_path / "r.json").read_text().startswith("{")


def test_bad_editor_output_is_reported():
    with pytest.raises(ValueError, match="expected uint8"):
        evaluate_shapeedit(lambda s, i, a: s[:-1], per_family=1, families=("remove",), progress=False)
    with pytest.raises(ValueError, match="attentions"):
        evaluate_shapeedit(lambda s, i, a: s, attentions=("flash",), progress=False)


@pytest.mark.parametrize("seed", [0, 1])
def test_float_frames_convert_to_uint8(seed):
    frames = np.random.default_rng(seed).random((2, 4, 4, 3))
    out = to_uint8_frames(frames)
    assert out.dtype == np.uint8 and np.abs(out / 255.0 - frames).max() <= 0.5 / 255 + 1e-9


def test_batched_pipeline_edits_match_one_clip_calls(shapeedit_pipeline):
    """Editing clips together gives what editing each alone through the pipeline gives."""
    from liveditor.data.shapes import ShapeEditConfig
    from liveditor.eval.shapeedit import pipeline_edit_fn

    pipe = shapeedit_pipeline
    config = ShapeEditConfig(frames=4, height=32, width=32)
    examples = [generate_example(s, "test", f, config) for s, f in ((0, "recolor"), (1, "add"), (2, "motion"))]
    sources = np.stack([e.source for e in examples])
    for mode, guidance in (("isa", 1.0), ("dense", 3.0)):
        batched = pipeline_edit_fn(pipe, 3, guidance, seed=5)(sources, [e.instruction for e in examples], mode)
        for example, out in zip(examples, batched):
            alone = pipe(example.source, example.instruction, num_inference_steps=3, guidance_scale=guidance, seed=5,
                         attention_kwargs={"mode": mode}).frames[0]
            difference = np.abs(out.astype(int) - to_uint8_frames(alone).astype(int))
            assert difference.max() <= 1, (mode, example.family)
