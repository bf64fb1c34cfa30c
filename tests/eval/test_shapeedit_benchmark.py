import numpy as np
import pytest

from liveditor.data.shapes import FAMILIES, generate_example
from liveditor.eval.metrics import PSNR_CAP_DB
from liveditor.atomic import write_json
from liveditor.eval.shapeedit import evaluate_shapeedit, format_summary, to_uint8_video


def _targets(per_family):
    examples = [generate_example(s, "test", f) for f in FAMILIES for s in range(per_family)]
    return {ex.source.tobytes(): ex.target for ex in examples}


def test_oracle_scores_perfectly_and_identity_fails():
    targets = _targets(2)
    calls = []

    def oracle(source, instruction, attention):
        calls.append(attention)
        return targets[source.tobytes()].copy()

    result = evaluate_shapeedit(oracle, per_family=2, progress=False)
    assert len(result["clips"]) == 2 * len(FAMILIES) and sorted(set(calls)) == ["dense", "isa"]
    overall = result["summary"]["all"]
    assert overall["isa"]["success_rate"] == overall["dense"]["success_rate"] == 100.0
    assert overall["isa_vs_dense_psnr"] == PSNR_CAP_DB and overall["isa"]["ssim"] == pytest.approx(1.0)

    nothing = evaluate_shapeedit(lambda s, i, a: s.copy(), per_family=2, attentions=("dense",), progress=False)
    for family in FAMILIES:
        entry = nothing["summary"][family]
        assert entry["dense"]["success_rate"] == 0.0
        assert entry["dense"]["psnr"] == pytest.approx(entry["input_psnr"])
    assert "isa_vs_dense_psnr" not in nothing["summary"]["all"]


def test_isa_vs_dense_psnr_measures_the_difference(tmp_path):
    targets = _targets(1)
    rng = np.random.default_rng()

    def editor(source, instruction, attention):
        out = targets[source.tobytes()].astype(np.int16)
        if attention == "isa":
            out = out + rng.integers(-3, 4, out.shape)
        return np.clip(out, 0, 255).astype(np.uint8)

    result = evaluate_shapeedit(editor, per_family=1, progress=False)
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


def test_float_frames_convert_to_uint8():
    frames = np.random.default_rng().random((2, 4, 4, 3))
    out = to_uint8_video(frames)
    assert out.dtype == np.uint8 and np.abs(out / 255.0 - frames).max() <= 0.5 / 255 + 1e-9
