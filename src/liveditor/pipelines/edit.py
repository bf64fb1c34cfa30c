"""`liveditor edit`: one video file, one instruction, one mp4 of the same duration, with a report.

The input is decoded frame by frame, resampled to the model's frame rate and fitted to its bucket
as it is read; a clip longer than the model's window is edited in overlapping windows (same seed
and instruction for each), the overlaps cross-faded, and the frames written as they are final, so
memory does not grow with the clip's length. The input's audio track is copied into the output.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LIVEditorError

# ShapeEdit-domain check of an input video for the bundled model (calibrated on ShapeEdit clips
# written as H.264 and resized to the bucket: palette share >= 0.97, flat share >= 0.37; ffmpeg's
# test patterns, noise and natural-looking gradients stay below 0.45 palette share).
PALETTE_TOLERANCE = 24  # per channel, 0..255
MIN_PALETTE_SHARE = 0.8
MIN_FLAT_SHARE = 0.25


@dataclass
class EditReport:
    output: Path
    num_frames: int
    height: int
    width: int
    fps: float
    input_fps: float
    input_size: tuple[int, int]  # (height, width)
    input_seconds: float  # duration of the edited part of the input
    fit: str  # bucket and crop/pad, in words
    window: int
    overlap: int
    windows: int
    seam_difference: float | None  # mean |a - b| (0..255) of overlapping windows' frames before blending
    frame_difference: float  # mean |frame - previous frame| (0..255) of the output, for scale
    audio_copied: bool
    seed: int
    load_seconds: float
    edit_seconds: float
    attention_seconds: float | None  # None: not measured (compiled blocks)
    attention_mode: str
    text_encoder_seconds: float = 0.0  # all windows; on the first rank in a parallel run
    vae_seconds: float = 0.0  # encode and decode, all windows
    parallel: str | None = None  # the GPU layout of a parallel run, in words

    @property
    def attention_share(self) -> float | None:
        if self.attention_seconds is None:
            return None
        return self.attention_seconds / self.edit_seconds if self.edit_seconds > 0 else 0.0

    @property
    def output_seconds(self) -> float:
        return self.num_frames / self.fps

    def summary(self) -> str:
        windows = "one pass" if self.windows == 1 else (
            f"{self.windows} windows of {self.window} frames, overlap {self.overlap}, seam difference "
            f"{self.seam_difference:.1f}/255 (frame-to-frame {self.frame_difference:.1f}/255)")
        return (
            f"wrote {self.output} ({self.num_frames} frames, {self.width}x{self.height}, "
            f"{self.output_seconds:.2f} s at {self.fps:g} fps; input {self.input_seconds:.2f} s at "
            f"{self.input_fps:g} fps, {self.input_size[1]}x{self.input_size[0]})\n"
            f"{self.fit}; {windows}; audio {'copied' if self.audio_copied else 'none'}; seed {self.seed}\n"
            f"total {self.load_seconds + self.edit_seconds:.2f} s (load {self.load_seconds:.2f} s, "
            f"edit {self.edit_seconds:.2f} s: text encoder {self.text_encoder_seconds:.2f} s, VAE "
            f"{self.vae_seconds:.2f} s); attention ({self.attention_mode}) "
            + (f"{self.attention_seconds:.2f} s = {100 * self.attention_share:.1f}% of the edit"
               if self.attention_seconds is not None else "time not measured (compiled blocks)")
            + (f"\n{self.parallel}" if self.parallel else "")
        )


def shapeedit_video_check(frames: np.ndarray) -> str | None:
    """None if uint8 `[F, H, W, 3]` frames look like the ShapeEdit domain (flat shapes of its
    palette on its backgrounds), else why not, in words."""
    from ..data.shapes import BACKGROUND_COLORS, OBJECT_COLORS, interior_mask

    step = max(1, frames.shape[0] // 8)
    sample = frames[::step]
    pixels = sample.reshape(-1, 3).astype(np.float32)
    objects = np.array(list(OBJECT_COLORS.values()), np.float32)
    dark = np.array(list(BACKGROUND_COLORS.values()), np.float32)
    light = dark + 0.225 * (255 - dark)  # backgrounds run from their colour towards this (shapes.render_background)
    to_object = np.abs(pixels[:, None] - objects[None]).max(-1).min(-1)
    span = light - dark
    t = np.clip(((pixels[:, None] - dark[None]) * span[None]).sum(-1) / (span**2).sum(-1)[None], 0, 1)
    to_background = np.abs(pixels[:, None] - (dark[None] + t[..., None] * span[None])).max(-1).min(-1)
    palette = float((np.minimum(to_object, to_background) <= PALETTE_TOLERANCE).mean())
    flat = float(interior_mask(sample).mean())
    if palette >= MIN_PALETTE_SHARE and flat >= MIN_FLAT_SHARE:
        return None
    return (f"the input video does not look like the ShapeEdit domain the tiny model was trained on "
            f"({palette:.0%} of pixels in its palette, {flat:.0%} in flat regions); the edit will likely be "
            f"textured noise")


def _padded_length(num_frames: int, temporal_factor: int) -> int:
    """Smallest `k * temporal_factor + 1` frame count not below num_frames."""
    return -(-(num_frames - 1) // temporal_factor) * temporal_factor + 1


def iter_windows(frames, window: int, overlap: int):
    """Yield `(start, frames)` windows of `window` consecutive frames from an iterator, each
    starting `window - overlap` after the previous; the last window ends at the last frame (it
    starts earlier, overlapping more, rather than being short). Holds at most `window` frames."""
    step = window - overlap
    recent = deque(maxlen=window)
    next_start, covered, count = 0, 0, 0
    for frame in frames:
        recent.append(frame)
        count += 1
        if count == next_start + window:
            yield next_start, list(recent)
            covered, next_start = count, next_start + step
    if count > covered:
        yield count - len(recent), list(recent)


class WindowBlender:
    """Joins edited windows: overlapping frames are cross-faded linearly from the earlier window to
    the later one; frames before the newest window are handed to `emit` as soon as they are final."""

    def __init__(self, emit):
        self.emit = emit
        self.pending, self.pending_start = None, 0
        self.seam_sums, self.seam_count = 0.0, 0
        self.diff_sum, self.diff_count, self.last_frame = 0.0, 0, None

    def add(self, start: int, frames: np.ndarray) -> None:
        if self.pending is not None:
            end = self.pending_start + self.pending.shape[0]
            overlap = end - start
            if overlap < 0 or start < self.pending_start:
                raise ValueError("windows must follow each other without gaps")
            self._emit(self.pending[: start - self.pending_start])
            if overlap > 0:
                earlier, later = self.pending[start - self.pending_start :], frames[:overlap]
                self.seam_sums += float(np.abs(earlier - later).mean()) * 255.0
                self.seam_count += 1
                weight = (np.arange(1, overlap + 1, dtype=np.float32) / (overlap + 1))[:, None, None, None]
                frames = np.concatenate([(1 - weight) * earlier + weight * later, frames[overlap:]])
        self.pending, self.pending_start = frames, start

    def finish(self) -> None:
        if self.pending is not None:
            self._emit(self.pending)
            self.pending = None

    def _emit(self, frames: np.ndarray) -> None:
        if frames.shape[0] == 0:
            return
        chain = frames if self.last_frame is None else np.concatenate([self.last_frame[None], frames])
        if chain.shape[0] > 1:
            self.diff_sum += float(np.abs(np.diff(chain, axis=0)).sum()) * 255.0 / chain[0].size
            self.diff_count += chain.shape[0] - 1
        self.last_frame = frames[-1]
        self.emit(frames)

    @property
    def seam_difference(self) -> float | None:
        return self.seam_sums / self.seam_count if self.seam_count else None

    @property
    def frame_difference(self) -> float:
        return self.diff_sum / self.diff_count if self.diff_count else 0.0


def _check_number(name: str, value, minimum: float, integer: bool = False, strict: bool = False):
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or (
            value <= minimum if strict else value < minimum):
        what = "an integer" if integer else "a finite number"
        raise LIVEditorError(f"{name} must be {what} {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return value


def run_edit(
    input_path,
    instruction: str,
    output_path,
    model=None,
    attention: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 42,
    negative_prompt: str | None = None,
    device: str | None = None,
    offload: bool | str | None = None,
    overwrite: bool = False,
    window: int | None = None,
    start: float = 0.0,
    duration: float | None = None,
    resize: str = "crop",
    compile: bool = False,
    fp8: bool = False,
    print_summary: bool = True,
    callback_on_step_end=None,
    parallel: tuple[int | None, int | None] | None = None,
) -> EditReport | None:
    """Edit a video file and write the result at the model's frame rate, keeping the duration.

    Every bad input fails with a one-line LIVEditorError before the model is loaded (and before
    torch is imported). `seed` < 0 draws a random seed (reported); `window` is the number of frames
    edited in one pass (default: the model's `max_num_frames`); `start` / `duration` (seconds) pick
    a part of the input; `resize` is "crop" or "pad"; `offload` ("model", "group", "sequential";
    True = "model"), `compile` and `fp8` as in `load_pipeline`. `callback_on_step_end` is handed to the
    pipeline for every window (diffusers' signature; `pipe._interrupt = True` stops the window).

    `parallel`: (CFG degree, Ulysses degree), either None for the default, when this process is
    one rank of an initialised torch.distributed world (`liveditor.pipelines.parallel.run_edit_parallel`
    starts them): every rank runs the edit, the first writes the output and returns the report, the
    others write nothing and return None.
    """
    from ..data.video_io import AudioSource, VideoWriter, check_writable_video_path, iter_video_frames, probe_video
    from .loading import check_pipeline_folder, load_pipeline, parse_offload

    if not isinstance(instruction, str) or not instruction.strip():
        raise LIVEditorError("the edit instruction is empty")
    _check_number("steps", steps, 1, integer=True)
    _check_number("window", window, 1, integer=True)
    _check_number("start", start, 0)
    _check_number("duration", duration, 0, strict=True)
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance)):
        raise LIVEditorError(f"guidance must be a finite number, got {guidance!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed > 2**63 - 1:
        raise LIVEditorError(f"seed must be an integer up to {2**63 - 1} (-1: random), got {seed!r}")
    if resize not in ("crop", "pad"):
        raise LIVEditorError(f"resize must be crop or pad, got {resize!r}")
    offload = parse_offload(offload)
    output_path = check_writable_video_path(output_path, overwrite)
    if Path(input_path).resolve() == output_path.resolve():
        raise LIVEditorError("the output path is the input video; choose another output")
    info = probe_video(input_path)
    bundled = model is None
    model = check_pipeline_folder(model)
    if info.duration and start >= info.duration:
        raise LIVEditorError(f"--start {start:g} s is not before the end of {input_path} ({info.duration:.2f} s)")
    main = parallel is None or _distributed_rank() == 0
    if bundled and main:
        from ..data.shapes import check_instruction

        domain = check_instruction(instruction)
        if not domain.in_domain:
            warnings.warn(f"bundled tiny model: {domain.message}", stacklevel=2)

    import torch

    from .pipeline_liveditor import check_seed, frames_to_tensor

    seed = check_seed(seed)
    if parallel is not None and (device is None or device.startswith("cuda")) and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.current_device()}"  # each rank its own GPU
    begin = time.perf_counter()
    pipe = load_pipeline(model, device=device, offload=offload, vae_tiling=bool(offload), compile=compile, fp8=fp8)
    load_seconds = time.perf_counter() - begin
    layout = None
    if parallel is not None:
        import torch.distributed as dist

        from .parallel import ParallelLayout, choose_degrees

        scale = pipe.sampling_settings(steps, guidance)[1]
        cfg_degree, ulysses = choose_degrees(dist.get_world_size(), scale != 1, *parallel)
        heads = pipe.transformer.config.num_attention_heads
        if heads % ulysses:
            raise LIVEditorError(f"Ulysses over {ulysses} GPUs (of {dist.get_world_size()}, CFG parallel {cfg_degree}) "
                                 f"must divide the model's {heads} attention heads; choose --gpus or --ulysses so")
        layout = ParallelLayout.create(cfg_degree, ulysses)
        pipe.enable_parallel(layout)
        if not layout.is_main:
            # Only the first rank encodes the prompt: the others free the text encoder (umT5-XXL:
            # about 11 GB of GPU memory for LIVEditor-14B).
            pipe.register_modules(text_encoder=None)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    transformer = pipe.transformer
    if attention is not None:
        transformer.set_attention_mode(attention)
    timer = transformer.attention_timer
    # Timing synchronises the GPU around each attention call, which a compiled block cannot hold.
    timer.enabled = not compile
    timer.reset()

    fps = float(pipe.config.fps)
    temporal = pipe.vae_scale_factor_temporal
    window = (min(window or pipe.config.max_num_frames, 100_000) - 1) // temporal * temporal + 1
    overlap = window // 4 if window >= 4 else 0
    fit = pipe.plan_fit((info.height, info.width), resize_mode=resize)
    bucket_h, bucket_w = fit.bucket
    top, left, content_h, content_w = fit.content
    content_h, content_w = content_h // 2 * 2, content_w // 2 * 2  # H.264 yuv420p needs even sizes

    def fitted_frames():
        for frame in iter_video_frames(input_path, fps=fps, start=start, duration=duration):
            yield fit.apply(frames_to_tensor(frame[None]))[0]

    audio = AudioSource(info.path, start, duration) if info.has_audio else None
    input_frames = 0
    stage_seconds = dict(text_encoder_s=0.0, vae_encode_s=0.0, vae_decode_s=0.0)
    begin = time.perf_counter()
    # In a parallel run only the first rank writes (atomically: nothing at `output_path` on failure).
    output = VideoWriter(output_path, fps, (content_h, content_w), overwrite=overwrite, audio=audio) if main else (
        nullcontext())
    with output as writer:
        blender = WindowBlender(writer.write) if main else None
        windows = 0
        for window_start, frames in iter_windows(fitted_frames(), window, overlap):
            count = len(frames)
            input_frames = max(input_frames, window_start + count)
            clip = torch.stack(frames)
            if bundled and main and windows == 0:
                problem = shapeedit_video_check((clip.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8))
                if problem:
                    warnings.warn(f"bundled tiny model: {problem}", stacklevel=2)
            padded = _padded_length(count, temporal)
            clip = torch.cat([clip, clip[-1:].expand(padded - count, -1, -1, -1)])  # repeat the last frame
            result = pipe(clip, instruction, negative_prompt=negative_prompt, height=bucket_h, width=bucket_w,
                          num_frames=padded, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                          output_type="np", callback_on_step_end=callback_on_step_end)
            for key in stage_seconds:
                stage_seconds[key] += (result.timings or {}).get(key, 0.0)
            windows += 1
            if main:
                blender.add(window_start, result.frames[0][:count, top : top + content_h, left : left + content_w])
        if main:
            blender.finish()
    if pipe._execution_device.type == "cuda":
        torch.cuda.synchronize()
    edit_seconds = time.perf_counter() - begin
    timer.enabled = False
    if not main:
        return None

    report = EditReport(
        output=output_path,
        num_frames=writer.num_frames,
        height=content_h,
        width=content_w,
        fps=fps,
        input_fps=info.fps,
        input_size=(info.height, info.width),
        input_seconds=min(duration or math.inf, info.duration - start) if info.duration else input_frames / fps,
        fit=fit.describe(),
        window=window,
        overlap=overlap,
        windows=windows,
        seam_difference=blender.seam_difference,
        frame_difference=blender.frame_difference,
        audio_copied=writer.audio_copied,
        seed=seed,
        load_seconds=load_seconds,
        edit_seconds=edit_seconds,
        attention_seconds=None if compile else timer.seconds,
        attention_mode=transformer.attention_mode,
        text_encoder_seconds=stage_seconds["text_encoder_s"],
        vae_seconds=stage_seconds["vae_encode_s"] + stage_seconds["vae_decode_s"],
        parallel=None if layout is None else f"parallel: {layout.describe()}",
    )
    if print_summary:
        print(report.summary())
    return report


def _distributed_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()
