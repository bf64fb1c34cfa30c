import copy
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from liveditor.atomic import write_json
from liveditor.cli import main
from liveditor.data.shapes import FAMILIES, generate_example
from liveditor.eval.compare import compare_results, format_comparison, sign_test_p
from liveditor.eval.shapeedit import evaluate_shapeedit
from python_process import child_env

PER_FAMILY = 3


def _result(seed, per_family=PER_FAMILY, split="val", attentions=("isa", "dense")):
    """A benchmark result whose editor returns the exact target for a seeded random half of the
    clips (a different half per attention mode) and the unedited input for the rest."""
    examples = [generate_example(s, split, f) for f in FAMILIES for s in range(per_family)]
    targets = {ex.source.tobytes(): ex.target for ex in examples}
    rng = np.random.default_rng(seed)
    right = {mode: {key: bool(rng.integers(2)) for key in targets} for mode in attentions}

    def edit(sources, instructions, attention):
        return np.stack([targets[s.tobytes()] if right[attention][s.tobytes()] else s for s in sources])

    return evaluate_shapeedit(edit, per_family=per_family, attentions=attentions, split=split, progress=False)


def test_sign_test_matches_the_binomial_tails():
    assert sign_test_p(5, 0) == pytest.approx(2 / 32)
    assert sign_test_p(0, 5) == pytest.approx(2 / 32)
    assert sign_test_p(9, 4) == pytest.approx(2 * 1093 / 8192)  # P(X <= 4) for X ~ Bin(13, 1/2)
    assert sign_test_p(10, 0) == pytest.approx(2 / 1024)
    assert sign_test_p(3, 3) == 1.0 and sign_test_p(0, 0) == 1.0


@pytest.mark.parametrize("seeds", [(0, 1), (2, 3)])
def test_wins_and_losses_are_counted_clip_by_clip(seeds):
    base, new = _result(seeds[0]), _result(seeds[1])
    comparison = compare_results(base, new, names=("a.json", "b.json"))
    assert comparison["clips"] == PER_FAMILY * len(FAMILIES) and comparison["attentions"] == ["isa", "dense"]
    pairs = list(zip(base["clips"], new["clips"]))
    groups = comparison["groups"]
    for mode in ("isa", "dense"):
        overall = groups["all"][mode]
        assert overall["won"] == sum(n[mode]["success"] and not b[mode]["success"] for b, n in pairs)
        assert overall["lost"] == sum(b[mode]["success"] and not n[mode]["success"] for b, n in pairs)
        assert overall["base_success_rate"] == pytest.approx(base["summary"]["all"][mode]["success_rate"])
        assert overall["new_success_rate"] == pytest.approx(new["summary"]["all"][mode]["success_rate"])
        assert overall["sign_test_p"] == pytest.approx(sign_test_p(overall["won"], overall["lost"]))
        for family in FAMILIES:
            assert groups[family][mode]["new_success_rate"] == pytest.approx(new["summary"][family][mode]["success_rate"])
        # The kinds of motion edit partition the motion clips, and their counts add up to the family's.
        kinds = [g for name, g in groups.items() if name.startswith("motion: ")]
        assert sum(g["clips"] for g in kinds) == groups["motion"]["clips"] == PER_FAMILY
        assert sum(g[mode]["won"] for g in kinds) == groups["motion"][mode]["won"]
    # With itself: nothing won or lost.
    same = compare_results(base, copy.deepcopy(base))
    assert all(g[m]["won"] == g[m]["lost"] == 0 for g in same["groups"].values() for m in ("isa", "dense"))
    table = format_comparison(comparison)
    assert f"| all | {PER_FAMILY * len(FAMILIES)} |" in table and "isa won / lost" in table


def test_only_the_same_clips_compare():
    base = _result(0)
    with pytest.raises(ValueError, match="different clips: 6 only in base"):
        compare_results(base, _result(1, per_family=PER_FAMILY - 1))
    with pytest.raises(ValueError, match="split differs"):
        compare_results(base, _result(1, split="test"))
    edited = copy.deepcopy(base)
    edited["clips"][4]["instruction"] = "make the sky green"
    with pytest.raises(ValueError, match="another instruction"):
        compare_results(base, edited)
    isa_only = _result(1, attentions=("isa",))
    assert compare_results(base, isa_only)["attentions"] == ["isa"]
    with pytest.raises(ValueError, match="not scored in both"):
        compare_results(base, isa_only, attentions=["dense"])
    # Settings that do not change the clips are listed, not refused.
    other = copy.deepcopy(base)
    other["settings"]["guidance"] = 3.0
    assert compare_results(base, other)["settings_differences"] == {"guidance": [None, 3.0]}


def test_compare_cli(tmp_path, capsys):
    base_path, new_path, out = tmp_path / "base.json", tmp_path / "new.json", tmp_path / "cmp.json"
    write_json(base_path, _result(0))
    write_json(new_path, _result(1))
    assert main(["eval", "compare", str(base_path), str(new_path), "--attention", "isa", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"base: {base_path}" in printed and "| motion |" in printed and "dense" not in printed
    saved = json.loads(out.read_text())
    assert saved["attentions"] == ["isa"] and saved["groups"]["all"]["clips"] == PER_FAMILY * len(FAMILIES)

    assert main(["eval", "compare", str(base_path), str(tmp_path / "missing.json")]) == 2
    assert "no benchmark result at" in capsys.readouterr().err
    (tmp_path / "other.json").write_text('{"loss": 1}')
    assert main(["eval", "compare", str(base_path), str(tmp_path / "other.json")]) == 2
    assert "is not a `liveditor eval shapeedit --json` result" in capsys.readouterr().err
    empty = json.loads(base_path.read_text())
    empty["clips"] = []
    write_json(tmp_path / "empty.json", empty)
    assert main(["eval", "compare", str(tmp_path / "empty.json"), str(new_path)]) == 2
    assert "is not a `liveditor eval shapeedit --json` result" in capsys.readouterr().err
    no_scores = json.loads(base_path.read_text())
    del no_scores["clips"][3]["dense"]
    write_json(tmp_path / "no_scores.json", no_scores)
    assert main(["eval", "compare", str(base_path), str(tmp_path / "no_scores.json")]) == 2
    assert "is not a `liveditor eval shapeedit --json` result" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text('{"clips": [')
    assert main(["eval", "compare", str(tmp_path / "broken.json"), str(new_path)]) == 2
    err = capsys.readouterr().err
    assert "is not JSON" in err and len(err.strip().splitlines()) == 1


def _compare_into_a_closed_pipe(tmp_path, python_args):
    """Run `liveditor eval compare` (via `python_args`) with stdout a pipe whose reader is gone
    before the first write, so that every write fails with EPIPE."""
    base_path, new_path = tmp_path / "base.json", tmp_path / "new.json"
    write_json(base_path, _result(0))
    write_json(new_path, _result(1))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, *python_args, "eval", "compare", str(base_path), str(new_path)],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, env=child_env(), timeout=120)
    finally:
        os.close(write_end)


def test_cli_into_a_pipe_whose_reader_went_away_ends_quietly(tmp_path):
    """`liveditor eval compare A B | head`: the reader closing the pipe is not an error worth a
    traceback; the command stops with 128 + SIGPIPE and prints nothing on stderr."""
    result = _compare_into_a_closed_pipe(tmp_path, ["-m", "liveditor.cli"])
    assert result.returncode == 128 + signal.SIGPIPE, result.stderr
    assert result.stderr == ""


WITHOUT_POLL = """
import select, sys
del select.poll  # as on Windows
from liveditor.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_where_a_closed_reader_cannot_be_told_the_broken_pipe_stays_the_error(tmp_path):
    """Without select.poll (Windows) the handler cannot tell a reader that went away from another
    broken pipe: the user sees the BrokenPipeError itself, not a failure inside the handler."""
    result = _compare_into_a_closed_pipe(tmp_path, ["-c", WITHOUT_POLL])
    assert result.returncode == 1
    assert "BrokenPipeError" in result.stderr and "AttributeError" not in result.stderr
