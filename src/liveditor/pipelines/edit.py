"""`liveditor edit`: one video, one instruction, one mp4, with a timing report."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LIVEditorError


@dataclass
class EditReport:
    output: Path
    num_frames: int
    height: int
    width: int
    fps: float
    load_seconds: float
    edit_seconds: float
    attention_seconds: float
    attention_mode: str

    @property
    def attention_share(self) -> float:
        return self.attention_seconds / self.edit_seconds if self.edit_seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"wrote {self.output} ({self.num_frames} frames, {self.width}x{self.height}, {self.fps:g} fps)\n"
            f"total {self.load_seconds + self.edit_seconds:.2f} s (load {self.load_seconds:.2f} s, "
            f"edit {self.edit_seconds:.2f} s); attention ({self.attention_mode}) "
            f"{self.attention_seconds:.2f} s = {100 * self.attention_share:.1f}% of the edit"
        )


def run_edit(
    input_path,
    instruction: str,
    output_path,
    model=None,
    attention: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    frames: int | None = None,
    negative_prompt: str | None = None,
    device: str | None = None,
    offload: bool = False,
    overwrite: bool = False,
    print_summary: bool = True,
) -> EditReport:
    """Edit a video file and write the result; every bad input fails before any work is done."""
    from ..data.video_io import check_writable_video_path, read_video, write_video
    from .loading import check_pipeline_folder, load_pipeline, resolve_device

    if not instruction or not instruction.strip():
        raise LIVEditorError("the edit instruction is empty")
    if steps is not None and steps < 1:
        raise LIVEditorError(f"--steps must be at least 1, got {steps}")
    if frames is not None and frames < 1:
        raise LIVEditorError(f"--frames must be at least 1, got {frames}")
    output_path = check_writable_video_path(output_path, overwrite)
    if Path(input_path).resolve() == output_path.resolve():
        raise LIVEditorError("the output path is the input video; choose another output")
    bundled = model is None
    model = check_pipeline_folder(model)
    if bundled:
        from ..data.shapes import check_instruction

        domain = check_instruction(instruction)
        if not domain.in_domain:
            warnings.warn(f"bundled tiny model: {domain.message}", stacklevel=2)
    clip = read_video(input_path)
    device = resolve_device(device)

    start = time.perf_counter()
    pipe = load_pipeline(model, device=device, offload=offload, vae_tiling=offload)
    load_seconds = time.perf_counter() - start
    transformer = pipe.transformer
    if attention is not None:
        transformer.set_attention_mode(attention)
    timer = transformer.attention_timer
    timer.enabled = True
    timer.reset()

    start = time.perf_counter()
    result = pipe(
        clip.frames,
        instruction,
        negative_prompt=negative_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        num_frames=frames,
        seed=seed,
        output_type="np",
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    edit_seconds = time.perf_counter() - start
    timer.enabled = False

    video = result.frames[0]
    write_video(output_path, video, fps=result.fps, overwrite=overwrite)
    report = EditReport(
        output=output_path,
        num_frames=video.shape[0],
        height=video.shape[1],
        width=video.shape[2],
        fps=result.fps,
        load_seconds=load_seconds,
        edit_seconds=edit_seconds,
        attention_seconds=timer.seconds,
        attention_mode=transformer.attention_mode,
    )
    if print_summary:
        print(report.summary())
    return report
