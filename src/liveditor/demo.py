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
import math
import random
import shutil
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
    seconds: float  # the edit itself
    total_seconds: float  # loading the model, the edit and writing the files
    psnr: float
    ssim: float
    success: bool
    edit_accuracy: float
    keep_accuracy: float

    def summary(self) -> str:
        verdict = "success" if self.success else "not a success"
        return (
            f'edited a fresh ShapeEdit clip (seed {self.seed}, {self.family}): "{self.instruction}"\n'
            f"{self.attention} attention; total {self.total_seconds:.1f} s (edit {self.seconds:.1f} s); "
            f"vs ground truth PSNR {self.psnr:.2f} dB, "
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
    seed: int = -1,
    family: str | None = None,
    model=None,
    attention: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    device: str | None = None,
    overwrite: bool = False,
    print_fn=print,
) -> DemoResult:
    """Generate, edit and write a demo into ``out_dir`` (created if missing; removed again if this
    call created it and then failed).

    ``seed`` picks the clip and the noise (-1: random). ``steps``/``guidance`` default to the model
    folder's sampling defaults.
    """
    from .data.video_io import check_writable_video_path
    from .pipelines.loading import check_pipeline_folder

    if family is not None and family not in FAMILIES:
        raise LIVEditorError(f"unknown edit family {family!r}; known: {', '.join(FAMILIES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not -1 <= seed <= 2**63 - 1:
        raise LIVEditorError(f"seed must be -1 (random) or a non-negative integer, got {seed!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise LIVEditorError(f"steps must be at least 1, got {steps}")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance)):
        raise LIVEditorError(f"guidance must be a finite number, got {guidance!r}")
    if attention not in (None, "isa", "dense"):
        raise LIVEditorError(f"attention must be isa or dense, got {attention!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LIVEditorError(f"output {out_dir} exists and is not a folder")
    if out_dir.is_dir():
        for name in OUTPUT_FILES[:3]:
            check_writable_video_path(out_dir / name, overwrite)
        if (out_dir / "demo.json").exists() and not overwrite:
            raise LIVEditorError(f"{out_dir / 'demo.json'} already exists; choose another folder or pass --overwrite")
    elif not out_dir.parent.is_dir():
        raise LIVEditorError(f"output folder {out_dir.parent} does not exist")
    model = check_pipeline_folder(model)
    created = not out_dir.exists()
    try:
        return _run_demo(out_dir, seed, family, model, attention, steps, guidance, device, overwrite, print_fn)
    except BaseException:
        if created and out_dir.is_dir():
            shutil.rmtree(out_dir)
        raise


def _run_demo(out_dir: Path, seed, family, model, attention, steps, guidance, device, overwrite, print_fn):
    from .atomic import atomic_output
    from .data.video_io import write_video
    from .eval.metrics import edit_success, psnr, ssim
    from .eval.shapeedit import to_uint8_video
    from .pipelines.loading import load_pipeline, resolve_device

    begin = time.perf_counter()
    if seed < 0:
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
    out_dir.mkdir(exist_ok=True)
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
        total_seconds=0.0,
        psnr=psnr(edited, example.target),
        ssim=ssim(edited, example.target),
        success=score.success,
        edit_accuracy=score.edit_accuracy,
        keep_accuracy=score.keep_accuracy,
    )
    demo.total_seconds = time.perf_counter() - begin
    record = {**asdict(demo), "model": str(model), "device": str(device), "steps": steps, "guidance": guidance,
              "side_by_side": "input | edit | ground truth"}
    with atomic_output(out_dir / "demo.json", "w") as handle:
        json.dump(record, handle, indent=2)
        handle.write("\n")
    if print_fn is not None:
        print_fn(demo.summary())
    return demo
