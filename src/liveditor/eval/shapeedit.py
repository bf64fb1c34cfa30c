"""The ShapeEdit benchmark: edit held-out ShapeEdit clips and score them against the exact targets.

For every edit family, ``per_family`` clips of the ``test`` split (seeds 0..per_family-1, never
used for training) are edited with each attention mode on the same weights and the same noise
seed. Per clip: PSNR and SSIM against the ground-truth target, the success criterion of
``liveditor.eval.metrics`` (edited region right, rest preserved), and the PSNR between the ISA and
the dense output. The "input" column is the PSNR of the unedited input against the target (what
doing nothing scores).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from ..data.shapes import FAMILIES, ShapeEditConfig, generate_example
from .metrics import PSNR_CAP_DB, edit_success, psnr, ssim

# (source uint8 [F, H, W, 3], instruction, attention mode) -> edited uint8 [F, H, W, 3]
EditFn = Callable[[np.ndarray, str, str], np.ndarray]

ATTENTION_MODES = ("isa", "dense")

def to_uint8_video(frames) -> np.ndarray:
    """A pipeline's float [F, H, W, 3] output in [0, 1] (or uint8) as uint8."""
    array = np.asarray(frames)
    if array.dtype == np.uint8:
        return array
    return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def pipeline_edit_fn(pipe, num_inference_steps: int | None = None, guidance_scale: float | None = None, seed: int = 0) -> EditFn:
    """Adapt a LIVEditorPipeline to the benchmark: one clip, the given attention mode, fixed seed
    (steps and guidance: None takes the pipeline folder's defaults)."""

    def edit(source: np.ndarray, instruction: str, attention: str) -> np.ndarray:
        _, H, W, _ = source.shape
        out = pipe(
            source,
            instruction,
            height=H,
            width=W,
            seed=seed,
            output_type="np",
            attention_kwargs={"mode": attention},
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
        ).frames[0]
        return to_uint8_video(out)

    return edit


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def summarize(clips: list[dict], attentions: Sequence[str], families: Sequence[str]) -> dict:
    """Per family and overall: success rate (%), mean PSNR/SSIM per attention mode, mean ISA-vs-dense PSNR."""
    summary = {}
    for family in list(families) + ["all"]:
        rows = [c for c in clips if family in ("all", c["family"])]
        entry = {"clips": len(rows), "input_psnr": _mean(c["input_psnr"] for c in rows)}
        for mode in attentions:
            scores = [c[mode] for c in rows]
            entry[mode] = {
                "success_rate": 100.0 * _mean(s["success"] for s in scores),
                "psnr": _mean(s["psnr"] for s in scores),
                "ssim": _mean(s["ssim"] for s in scores),
                "edit_accuracy": _mean(s["edit_accuracy"] for s in scores),
                "keep_accuracy": _mean(s["keep_accuracy"] for s in scores),
                "seconds": _mean(s["seconds"] for s in scores),
            }
        if "isa" in attentions and "dense" in attentions:
            entry["isa_vs_dense_psnr"] = _mean(c["isa_vs_dense_psnr"] for c in rows)
        summary[family] = entry
    return summary


def evaluate_shapeedit(
    edit_fn: EditFn,
    per_family: int = 10,
    attentions: Sequence[str] = ATTENTION_MODES,
    families: Sequence[str] = FAMILIES,
    config: ShapeEditConfig | None = None,
    progress: bool = True,
) -> dict:
    """Run the benchmark; returns ``{"clips": [...], "summary": {...}, "settings": {...}}``."""
    from tqdm.auto import tqdm

    if isinstance(per_family, bool) or not isinstance(per_family, int) or per_family < 1:
        raise ValueError(f"per_family must be a positive int, got {per_family!r}")
    attentions = tuple(attentions)
    if not attentions or any(a not in ATTENTION_MODES for a in attentions) or len(set(attentions)) != len(attentions):
        raise ValueError(f"attentions must be distinct modes from {ATTENTION_MODES}, got {attentions}")
    families = tuple(families)
    if not families or any(f not in FAMILIES for f in families):
        raise ValueError(f"families must be from {FAMILIES}, got {families}")
    config = ShapeEditConfig() if config is None else config

    clips = []
    jobs = [(family, seed) for family in families for seed in range(per_family)]
    for family, seed in tqdm(jobs, desc="ShapeEdit benchmark", unit="clip", disable=not progress):
        example = generate_example(seed, "test", family, config)
        row = {
            "family": family,
            "seed": seed,
            "instruction": example.instruction,
            "input_psnr": psnr(example.source, example.target),
        }
        outputs = {}
        for mode in attentions:
            start = time.perf_counter()
            out = edit_fn(example.source, example.instruction, mode)
            seconds = time.perf_counter() - start
            if not isinstance(out, np.ndarray) or out.shape != example.target.shape or out.dtype != np.uint8:
                raise ValueError(
                    f"the editor returned {getattr(out, 'dtype', type(out))} {getattr(out, 'shape', '')}, "
                    f"expected uint8 {example.target.shape}"
                )
            outputs[mode] = out
            result = edit_success(out, example.source, example.target)
            row[mode] = {
                "psnr": psnr(out, example.target),
                "ssim": ssim(out, example.target),
                "success": result.success,
                "edit_accuracy": result.edit_accuracy,
                "keep_accuracy": result.keep_accuracy,
                "seconds": seconds,
            }
        if "isa" in outputs and "dense" in outputs:
            row["isa_vs_dense_psnr"] = psnr(outputs["isa"], outputs["dense"])
        clips.append(row)
    return {
        "settings": {"per_family": per_family, "split": "test", "attentions": list(attentions), "config": config.__dict__.copy()},
        "clips": clips,
        "summary": summarize(clips, attentions, families),
    }


def format_summary(result: dict) -> str:
    """Markdown table of a benchmark result: one row per family plus "all"."""
    attentions = result["settings"]["attentions"]
    both = "isa" in attentions and "dense" in attentions
    header = ["family", "clips"]
    for metric in ("success %", "PSNR", "SSIM"):
        header += [f"{metric} {mode}" for mode in attentions]
    header += ["input PSNR"] + (["ISA vs dense PSNR"] if both else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for family, entry in result["summary"].items():
        cells = [family, str(entry["clips"])]
        cells += [f"{entry[m]['success_rate']:.1f}" for m in attentions]
        cells += [f"{entry[m]['psnr']:.2f}" for m in attentions]
        cells += [f"{entry[m]['ssim']:.3f}" for m in attentions]
        cells.append(f"{entry['input_psnr']:.2f}")
        if both:
            value = entry["isa_vs_dense_psnr"]
            cells.append("identical" if value >= PSNR_CAP_DB else f"{value:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    if both:
        overall = result["summary"]["all"]
        gap = overall["isa"]["success_rate"] - overall["dense"]["success_rate"]
        lines.append(f"\nISA - dense success rate: {gap:+.1f} points over {overall['clips']} clips")
    return "\n".join(lines)


