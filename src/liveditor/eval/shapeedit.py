"""The ShapeEdit benchmark: edit held-out ShapeEdit clips and score them against the exact targets.

For every edit family, ``per_family`` clips of the ``test`` split (seeds 0..per_family-1, never
used for training) are edited with each attention mode on the same weights and the same noise
seed. Per clip: PSNR and SSIM against the ground-truth target, the success criterion of
``liveditor.eval.metrics`` (edited region right, rest preserved), and the PSNR between the ISA and
the dense output; each clip also keeps its edit's parameters and its edit accuracy per frame (a
motion clip also how far, in pixels, the edited object is from where the target has it, per frame),
and the motion family is summarised by kind of motion edit. The "input" column is the PSNR of the
unedited input against the target (what doing nothing scores).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from ..data.shapes import FAMILIES, MOTIONS, OBJECT_COLORS, ShapeEditConfig, generate_example
from ..data.video_io import to_uint8_frames
from ..errors import InvalidArgumentError
from .metrics import PSNR_CAP_DB, edit_success, position_error_per_frame, psnr, ssim

# (sources uint8 [B, F, H, W, 3], instructions, attention mode) -> edited uint8 [B, F, H, W, 3]
EditFn = Callable[[np.ndarray, list, str], np.ndarray]

ATTENTION_MODES = ("isa", "dense")


def pipeline_edit_fn(pipe, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                     seed: int = 0) -> EditFn:
    """Adapt a LIVEditorPipeline to the benchmark: a batch of clips edited together, each exactly as
    `pipe(source, instruction, seed=seed, attention_kwargs={"mode": attention})` would edit it alone
    (the same per-clip noise, solver and guidance; steps and guidance: None takes the folder's
    defaults). Batching only runs the clips' denoising steps as one transformer call."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    def edit(sources: np.ndarray, instructions: list, attention: str) -> np.ndarray:
        steps, guidance = pipe.sampling_settings(num_inference_steps, guidance_scale)
        _, _, height, width, _ = sources.shape
        device, dtype = pipe._execution_device, pipe.transformer.dtype
        do_cfg = guidance > 1.0
        with torch.no_grad():
            pixels = torch.cat([pipe.prepare_video(source, height, width)[0] for source in sources])
            prompts = [pipe.encode_prompt(text, None, do_cfg, device=device, dtype=dtype) for text in instructions]
            text = torch.cat([p for p, _ in prompts])
            negative = torch.cat([n for _, n in prompts]) if do_cfg else None
            context = pipe.encode_video(pixels).to(device=device, dtype=torch.float32)
            latents = torch.cat([
                randn_tensor((1, *context.shape[1:]), generator=torch.Generator(device).manual_seed(int(seed)),
                             device=device, dtype=torch.float32)
                for _ in sources
            ])
            context = context.to(dtype)
            kwargs = {"mode": attention}
            for t in pipe.set_sampling_timesteps(steps, device):
                model_input = latents.to(dtype)
                step_t = t.expand(latents.shape[0])
                flow = pipe.transformer(model_input, step_t, text, context, attention_kwargs=kwargs, return_dict=False)[0]
                if do_cfg:
                    flow_uncond = pipe.transformer(model_input, step_t, negative, context, attention_kwargs=kwargs,
                                                   return_dict=False)[0]
                    flow = flow_uncond + guidance * (flow - flow_uncond)
                latents = pipe.scheduler.step(flow.float(), t, latents, return_dict=False)[0]
            video = pipe.decode_latents(latents).float().clamp(-1.0, 1.0)
        frames = ((video + 1.0) / 2.0).permute(0, 2, 3, 4, 1).cpu().numpy()  # [B, F, H, W, 3]
        return to_uint8_frames(frames)

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


def _edited_colour(example) -> tuple[int, int, int]:
    """RGB of the object a (non-background) edit acts on, as the source scene draws it."""
    objects = example.metadata["source_scene"]["objects"]
    return OBJECT_COLORS[objects[example.metadata["edit"]["object"]]["color"]]


def _median_position_error(rows: list[dict], mode: str, second_half: bool) -> float | None:
    """Median position error over the frames in the first or the second half of the clips."""
    errors = []
    for c in rows:
        per_frame = c[mode]["position_error_per_frame"]
        half = len(per_frame) // 2
        errors += [e for e in (per_frame[half:] if second_half else per_frame[:half]) if e is not None]
    return float(np.median(errors)) if errors else None


def summarize_motion(clips: list[dict], attentions: Sequence[str]) -> dict:
    """The motion family by kind of motion edit (reverse, stop, faster, left, ...): clips, success
    rate (%), mean edit accuracy and the median distance (pixels) between where the edited object is
    in the output and in the target, over the first and the second half of the frames, per attention
    mode. Kinds without clips are left out."""
    by_kind = {}
    for kind in MOTIONS:
        rows = [c for c in clips if c["family"] == "motion" and c["edit"]["motion"] == kind]
        if rows:
            by_kind[kind] = {"clips": len(rows)}
            for mode in attentions:
                by_kind[kind][mode] = {
                    "success_rate": 100.0 * _mean(c[mode]["success"] for c in rows),
                    "edit_accuracy": _mean(c[mode]["edit_accuracy"] for c in rows),
                    "position_error_px": {"first_half": _median_position_error(rows, mode, False),
                                          "second_half": _median_position_error(rows, mode, True)},
                }
    return by_kind


def evaluate_shapeedit(
    edit_fn: EditFn,
    per_family: int = 10,
    attentions: Sequence[str] = ATTENTION_MODES,
    families: Sequence[str] = FAMILIES,
    config: ShapeEditConfig | None = None,
    progress: bool = True,
    split: str = "test",
    batch_size: int = 16,
) -> dict:
    """Run the benchmark; returns ``{"clips": [...], "summary": {...}, "settings": {...}}``.

    split: "test" (held out, the benchmark) or "val" (watched during training). Clips are edited
    `batch_size` at a time; "seconds" per clip is the batch's time over its clips."""
    from tqdm.auto import tqdm

    if isinstance(per_family, bool) or not isinstance(per_family, int) or per_family < 1:
        raise InvalidArgumentError(f"per_family must be a positive int, got {per_family!r}")
    attentions = tuple(attentions)
    if not attentions or any(a not in ATTENTION_MODES for a in attentions) or len(set(attentions)) != len(attentions):
        raise InvalidArgumentError(f"attentions must be distinct modes from {ATTENTION_MODES}, got {attentions}")
    families = tuple(families)
    if not families or any(f not in FAMILIES for f in families):
        raise InvalidArgumentError(f"families must be from {FAMILIES}, got {families}")
    if split not in ("val", "test"):
        raise InvalidArgumentError(f'split must be "val" or "test", got {split!r}')
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
    config = ShapeEditConfig() if config is None else config

    clips = []
    jobs = [(family, seed) for family in families for seed in range(per_family)]
    bar = tqdm(total=len(jobs), desc="ShapeEdit benchmark", unit="clip", disable=not progress)
    for first in range(0, len(jobs), batch_size):
        chunk = jobs[first:first + batch_size]
        examples = [generate_example(seed, split, family, config) for family, seed in chunk]
        sources = np.stack([e.source for e in examples])
        outputs, seconds = {}, {}
        for mode in attentions:
            start = time.perf_counter()
            out = edit_fn(sources, [e.instruction for e in examples], mode)
            seconds[mode] = (time.perf_counter() - start) / len(chunk)
            if not isinstance(out, np.ndarray) or out.shape != sources.shape or out.dtype != np.uint8:
                raise ValueError(
                    f"the editor returned {getattr(out, 'dtype', type(out))} {getattr(out, 'shape', '')}, "
                    f"expected uint8 {sources.shape}"
                )
            outputs[mode] = out
        for i, ((family, seed), example) in enumerate(zip(chunk, examples)):
            row = {
                "family": family,
                "seed": seed,
                "instruction": example.instruction,
                "edit": dict(example.metadata["edit"]),
                "input_psnr": psnr(example.source, example.target),
            }
            for mode in attentions:
                out = outputs[mode][i]
                result = edit_success(out, example.source, example.target)
                row[mode] = {
                    "psnr": psnr(out, example.target),
                    "ssim": ssim(out, example.target),
                    "success": result.success,
                    "edit_accuracy": result.edit_accuracy,
                    "keep_accuracy": result.keep_accuracy,
                    "edit_accuracy_per_frame": list(result.edit_accuracy_per_frame),
                    "seconds": seconds[mode],
                }
                if family == "motion":
                    row[mode]["position_error_per_frame"] = list(
                        position_error_per_frame(out, example.target, _edited_colour(example)))
            if "isa" in outputs and "dense" in outputs:
                row["isa_vs_dense_psnr"] = psnr(outputs["isa"][i], outputs["dense"][i])
            clips.append(row)
        bar.update(len(chunk))
    bar.close()
    result = {
        "settings": {"per_family": per_family, "split": split, "attentions": list(attentions), "config": config.__dict__.copy()},
        "clips": clips,
        "summary": summarize(clips, attentions, families),
    }
    if "motion" in families:
        result["motion_by_kind"] = summarize_motion(clips, attentions)
    return result


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
    if result.get("motion_by_kind"):
        kinds, drift = [], []
        for kind, entry in result["motion_by_kind"].items():
            rates = " / ".join(f"{entry[mode]['success_rate']:.0f}" for mode in attentions)
            kinds.append(f"{kind} {rates} ({entry['clips']})")
            halves = entry[attentions[0]]["position_error_px"]
            drift.append(f"{kind} " + " -> ".join("-" if halves[h] is None else f"{halves[h]:.1f}"
                                                 for h in ("first_half", "second_half")))
        lines.append(f"motion by kind, success % {' / '.join(attentions)} (clips): {', '.join(kinds)}")
        lines.append(f"motion by kind, {attentions[0]} median object position error px (first -> second half of "
                     f"the frames): {', '.join(drift)}")
    return "\n".join(lines)


