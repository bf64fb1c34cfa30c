"""Two ShapeEdit benchmark results on the same clips, compared clip by clip.

A model (or a setting) replaces another only if it wins more clips than it loses; with a few hundred
clips a difference of a few points can be chance. `compare_results` counts, per edit family, per
kind of motion edit and overall, the clips that succeed with one result and fail with the other, and
gives the two-sided sign test's p-value on those counts (clips that both pass or both fail say
nothing about which is better). The results must score the same clips (same split, ShapeEdit config
and seeds); their settings (model, guidance, steps, noise seed) may differ, and the differences are
listed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..data.shapes import MOTIONS
from ..errors import InputNotFoundError, InvalidArgumentError

# Settings that say which clips were scored; they must be equal for a clip-by-clip comparison.
CLIP_SETTINGS = ("split", "config")


def sign_test_p(won: int, lost: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven between `won` and
    `lost` if either result were equally likely to win each clip that only one of them passes."""
    n = won + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(won, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _is_benchmark_result(result) -> bool:
    """Settings naming the attention modes, and at least one clip, each with its scores in every mode."""
    if not isinstance(result, dict) or not isinstance(result.get("settings"), dict):
        return False
    modes, clips = result["settings"].get("attentions"), result.get("clips")
    if not isinstance(modes, list) or not isinstance(clips, list) or not clips:
        return False
    return all(isinstance(clip, dict) and {"family", "seed", "instruction"} <= clip.keys()
               and all(isinstance(clip.get(mode), dict) and "success" in clip[mode] for mode in modes)
               for clip in clips)


def load_result(path: str | Path) -> dict:
    """A `liveditor eval shapeedit --json` file, with a one-line error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"no benchmark result at {path}")
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"{path} is not JSON: {exc}") from None
    if not _is_benchmark_result(result):
        raise InvalidArgumentError(f"{path} is not a `liveditor eval shapeedit --json` result "
                                   "(clips with their scores, and settings)")
    return result


def _by_clip(result: dict, name: str) -> dict:
    clips = {}
    for clip in result["clips"]:
        key = (clip["family"], clip["seed"])
        if key in clips:
            raise InvalidArgumentError(f"{name} scores clip {key[0]} {key[1]} twice")
        clips[key] = clip
    return clips


def _groups(clips: list[dict]) -> dict[str, list[dict]]:
    """Clips per family (in order of first appearance), per kind of motion edit, and all of them."""
    groups: dict[str, list[dict]] = {}
    for clip in clips:
        groups.setdefault(clip["family"], []).append(clip)
    motion = groups.get("motion", [])
    kinds = {f"motion: {kind}": [c for c in motion if c.get("edit", {}).get("motion") == kind] for kind in MOTIONS}
    return {**groups, **{kind: rows for kind, rows in kinds.items() if rows}, "all": clips}


def compare_results(base: dict, new: dict, attentions=None, names: tuple[str, str] = ("base", "new")) -> dict:
    """Compare benchmark result `new` with `base` clip by clip.

    attentions: the modes to compare (default: every mode both results scored). Returns
    ``{"names", "split", "clips", "attentions", "settings_differences": {key: [base, new]},
    "groups": {group: {"clips": n, mode: {"base_success_rate", "new_success_rate", "won", "lost",
    "sign_test_p"}}}}``, where "won" counts clips only `new` passes and "lost" clips only `base` passes.
    """
    base_name, new_name = names
    for key in CLIP_SETTINGS:
        if base["settings"].get(key) != new["settings"].get(key):
            raise InvalidArgumentError(f"{base_name} and {new_name} score different clips: their {key} differs "
                                       f"({base['settings'].get(key)!r} against {new['settings'].get(key)!r})")
    base_clips, new_clips = _by_clip(base, base_name), _by_clip(new, new_name)
    if base_clips.keys() != new_clips.keys():
        only_base, only_new = len(base_clips.keys() - new_clips.keys()), len(new_clips.keys() - base_clips.keys())
        raise InvalidArgumentError(f"{base_name} and {new_name} score different clips: {only_base} only in "
                                   f"{base_name}, {only_new} only in {new_name} (run both with the same "
                                   "--per-family and --families)")
    for key, clip in base_clips.items():
        if clip["instruction"] != new_clips[key]["instruction"]:
            raise InvalidArgumentError(f"clip {key[0]} {key[1]} has another instruction in {new_name} "
                                       f"({new_clips[key]['instruction']!r} against {clip['instruction']!r}): "
                                       "results from different ShapeEdit versions")
    common = [m for m in base["settings"]["attentions"] if m in new["settings"]["attentions"]]
    if attentions is None:
        attentions = common
    attentions = list(attentions)
    missing = [m for m in attentions if m not in common]
    if not attentions or missing:
        raise InvalidArgumentError(f"attention modes {missing or attentions} are not scored in both results "
                                   f"(both have: {', '.join(common) or 'none'})")

    groups = {}
    for group, clips in _groups(list(base_clips.values())).items():
        entry = {"clips": len(clips)}
        for mode in attentions:
            before = [c[mode]["success"] for c in clips]
            after = [new_clips[(c["family"], c["seed"])][mode]["success"] for c in clips]
            won = sum(a and not b for a, b in zip(after, before))
            lost = sum(b and not a for a, b in zip(after, before))
            entry[mode] = {
                "base_success_rate": 100.0 * sum(before) / len(clips),
                "new_success_rate": 100.0 * sum(after) / len(clips),
                "won": won,
                "lost": lost,
                "sign_test_p": sign_test_p(won, lost),
            }
        groups[group] = entry
    differences = {key: [base["settings"].get(key), new["settings"].get(key)]
                   for key in sorted(set(base["settings"]) | set(new["settings"]))
                   if key not in CLIP_SETTINGS + ("attentions",) and base["settings"].get(key) != new["settings"].get(key)}
    return {"names": [base_name, new_name], "split": base["settings"].get("split"), "clips": len(base_clips),
            "attentions": attentions, "settings_differences": differences, "groups": groups}


def format_comparison(comparison: dict) -> str:
    """Markdown table of `compare_results`: success of each result, clips won and lost, sign test."""
    base_name, new_name = comparison["names"]
    header = ["group", "clips"]
    for mode in comparison["attentions"]:
        header += [f"{mode} base %", f"{mode} new %", f"{mode} won / lost", f"{mode} p"]
    lines = [f"base: {base_name}", f"new: {new_name}",
             f"{comparison['clips']} {comparison['split']} clips; won: clips only new passes, lost: clips only base "
             "passes; p: two-sided sign test", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, entry in comparison["groups"].items():
        cells = [group, str(entry["clips"])]
        for mode in comparison["attentions"]:
            scores = entry[mode]
            cells += [f"{scores['base_success_rate']:.1f}", f"{scores['new_success_rate']:.1f}",
                      f"{scores['won']} / {scores['lost']}", f"{scores['sign_test_p']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    if comparison["settings_differences"]:
        changed = ", ".join(f"{key} {a!r} -> {b!r}" for key, (a, b) in comparison["settings_differences"].items())
        lines.append(f"\nsettings that differ: {changed}")
    return "\n".join(lines)
