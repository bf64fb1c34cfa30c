"""`liveditor demo -o DIR`: generate a fresh ShapeEdit clip, edit it with a LIVEditor pipeline
(default: the bundled tiny model) and write what a newcomer wants to look at:

    DIR/input.mp4          the generated clip
    DIR/edit.mp4           the model's edit
    DIR/side_by_side.mp4   input | edit | exact ground truth, enlarged for viewing
    DIR/demo.json          instruction, family, seed, settings, PSNR/SSIM/success vs ground truth

Nothing in DIR is overwritten unless asked; every file is written atomically.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .data.shapes import FAMILIES, ShapeEditConfig, generate_example
from .errors import LIVEditorError

OUTPUT_FILES = ("input.mp4", "edit.mp4", "side_by_side.mp4", "demo.json")
VIEW_SCALE = 4  # side-by-side panels are enlarged (nearest neighbour) so 64x64 clips are visible


@dataclass
class DemoResult:
    directory: str
    seed: int
    family: str
    instruction: str
    attention: str
    seconds: float
    psnr: float
    ssim: float
    success: bool
    edit_accuracy: float
    keep_accuracy: float

    def summary(self) -> str:
        verdict = "success" if self.success else "not a success"
        return (
            f'edited a fresh ShapeEdit clip (seed {self.seed}, {self.family}): "{self.instruction}"\n'
            f"{self.attention} attention, {self.seconds:.1f} s; vs ground truth PSNR {self.psnr:.2f} dB, "
            f"SSIM {self.ssim:.3f}, {verdict} (edit accuracy {self.edit_accuracy:.0%}, "
            f"keep accuracy {self.keep_accuracy:.0%})\n"
            f"wrote {self.directory}/{{{', '.join(OUTPUT_FILES)}}}"
        )


def example_input_path() -> Path:
    """The bundled example input clip (``liveditor/assets/examples/shapes.mp4``, see its README)."""
    return Path(__file__).resolve().parent / "assets" / "examples" / "shapes.mp4"


def side_by_side(*videos: np.ndarray, scale: int = VIEW_SCALE, gap: int = 4) -> np.ndarray:
    """Videos ``[F, H, W, 3]`` of one shape side by side, enlarged ``scale`` times, white gaps."""
    enlarged = [v.repeat(scale, axis=1).repeat(scale, axis=2) for v in videos]
    F, H = enlarged[0].shape[:2]
    separator = np.full((F, H, gap, 3), 255, dtype=np.uint8)
    panels = []
    for i, v in enumerate(enlarged):
        if i:
            panels.append(separator)
        panels.append(v)
    return np.concatenate(panels, axis=2)


def run_demo(
    out_dir,
    seed: int | None = None,
    family: str | None = None,
    model=None,
    attention: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    device: str | None = None,
    overwrite: bool = False,
    print_fn=print,
) -> DemoResult:
    """Generate, edit and write a demo into ``out_dir`` (created if missing).

    ``steps``/``guidance`` default to the model folder's sampling defaults.
    """
    from .atomic import atomic_output
    from .data.video_io import check_writable_video_path, write_video
    from .eval.metrics import edit_success, psnr, ssim
    from .eval.shapeedit import to_uint8_video
    from .pipelines.loading import check_pipeline_folder, load_pipeline, resolve_device

    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown edit family {family!r}; known: {', '.join(FAMILIES)}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be at least 1, got {steps}")
    if attention not in (None, "isa", "dense"):
        raise ValueError(f"attention must be isa or dense, got {attention!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LIVEditorError(f"output {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES[:3]:
        check_writable_video_path(out_dir / name, overwrite)
    if (out_dir / "demo.json").exists() and not overwrite:
        raise LIVEditorError(f"{out_dir / 'demo.json'} already exists; choose another folder or allow overwriting")
    model = check_pipeline_folder(model)

    if seed is None:
        seed = random.SystemRandom().randrange(1_000_000)
    device = resolve_device(device)
    pipe = load_pipeline(model, device=device)
    if attention is not None:
        pipe.transformer.set_attention_mode(attention)
    height, width = pipe.resolution_buckets[0]
    config = ShapeEditConfig(height=height, width=width)
    # Held-out split: the clip was never seen in training.
    example = generate_example(seed, "test", family, config)

    steps, guidance = pipe.sampling_settings(steps, guidance)
    start = time.perf_counter()
    result = pipe(example.source, example.instruction, num_inference_steps=steps, guidance_scale=guidance,
                  height=height, width=width, seed=seed, output_type="np")
    seconds = time.perf_counter() - start
    edited = to_uint8_video(result.frames[0])
    if edited.shape != example.source.shape:
        raise LIVEditorError(f"the model returned a {edited.shape} video for a {example.source.shape} clip")

    fps = result.fps
    write_video(out_dir / "input.mp4", example.source, fps=fps, overwrite=overwrite)
    write_video(out_dir / "edit.mp4", edited, fps=fps, overwrite=overwrite)
    write_video(out_dir / "side_by_side.mp4", side_by_side(example.source, edited, example.target), fps=fps, overwrite=overwrite)
    score = edit_success(edited, example.source, example.target)
    demo = DemoResult(
        directory=str(out_dir),
        seed=seed,
        family=example.family,
        instruction=example.instruction,
        attention=pipe.transformer.attention_mode,
        seconds=seconds,
        psnr=psnr(edited, example.target),
        ssim=ssim(edited, example.target),
        success=score.success,
        edit_accuracy=score.edit_accuracy,
        keep_accuracy=score.keep_accuracy,
    )
    record = {**asdict(demo), "model": str(model), "device": str(device), "steps": steps, "guidance": guidance,
              "side_by_side": "input | edit | ground truth"}
    with atomic_output(out_dir / "demo.json", "w") as handle:
        json.dump(record, handle, indent=2)
        handle.write("\n")
    if print_fn is not None:
        print_fn(demo.summary())
    return demo
