"""LIVEditorPipeline: instruction-guided video editing with the in-context LIVEditor transformer."""

from __future__ import annotations

import functools
import html
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, UniPCMultistepScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..errors import LIVEditorError
from ..models import LIVEditorTransformer3DModel  # imported so that from_pretrained may load it

# Wan's Chinese negative prompt exactly as the LIVEditor release's inference config spells it
# (", " separators; Wan2.2's own config uses full-width commas). Kept in Chinese, the language the
# umT5 negative branch was trained with.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽, 过曝, 静态, 细节模糊不清, 字幕, 风格, 作品, 画作, 画面, 静止, 整体发灰, 最差质量, 低质量, JPEG压缩残留, "
    "丑陋的, 残缺的, 多余的手指, 画得不好的手部, 画得不好的脸部, 畸形的, 毁容的, 形态畸形的肢体, 手指融合, "
    "静止不动的画面, 杂乱的背景, 三条腿, 背景人很多, 倒着走"
)

# (height, width) buckets of LIVEditor-14B (spec section 3) and the exact aspect ratios (W/H) the
# release compares an input against when it picks one: 16:9, 9:16, 1:1, 2:1, 1:2.
LIVEDITOR_14B_BUCKETS = ((544, 960), (960, 544), (720, 720), (480, 960), (960, 480))
NOMINAL_ASPECT_RATIOS = {(544, 960): 16 / 9, (960, 544): 9 / 16, (720, 720): 1.0, (480, 960): 2.0, (960, 480): 0.5}
DEFAULT_FLOW_SHIFT = 6.0
DEFAULT_SEED = 42  # the release's default noise seed
WAN_SIGMA_MAX = 0.999  # first (unshifted) sigma of Wan's sampling grid, which runs linearly to 0
RESIZE_MODES = ("crop", "pad")
RESIZE_MULTIPLE = 16  # the release rounds the intermediate (cover) size up to a multiple of 16
MAX_SEED = 2**63 - 1


def flow_unipc_scheduler(flow_shift: float = DEFAULT_FLOW_SHIFT) -> UniPCMultistepScheduler:
    """diffusers' UniPC solver in flow-matching mode as Wan configures its own (order 2, bh2), with
    LIVEditor's shift. The pipeline hands it Wan's sigma grid (`wan_sigmas`) at every call."""
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
        solver_order=2,
        solver_type="bh2",
    )


def wan_sigmas(num_inference_steps: int, sigma_max: float = WAN_SIGMA_MAX) -> np.ndarray:
    """Wan's unshifted sampling grid: `num_inference_steps` sigmas spaced linearly from `sigma_max`
    towards 0 (0 itself excluded). diffusers' flow UniPC shifts them and appends the final 0, which
    reproduces Wan's FlowUniPCMultistepScheduler grid (diffusers' own default starts at 1 and ends
    at 1/1000 instead)."""
    return np.linspace(sigma_max, 0.0, num_inference_steps + 1)[:-1].copy()


@functools.lru_cache(maxsize=1)
def _ftfy_fix_text():
    try:
        import ftfy
    except ImportError:  # optional (the editor extra installs it): only mojibake repair is skipped
        return None
    return ftfy.fix_text


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy's text repair (when installed), HTML entities unescaped twice,
    whitespace runs collapsed to one space, ends stripped."""
    fix_text = _ftfy_fix_text()
    if fix_text is not None:
        text = fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def encode_instructions(tokenizer, text_encoder, prompts: list[str], max_length: int, device=None) -> torch.Tensor:
    """Instruction embeddings as LIVEditor uses them (at inference and in training): cleaned,
    fixed-length tokens through `text_encoder(...).last_hidden_state`, positions past the prompt
    zeroed (Wan's convention). `device`: where the tokens go (default: the text encoder's)."""
    device = next(text_encoder.parameters()).device if device is None else device
    tokens = tokenizer(
        [clean_prompt(p) for p in prompts],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    mask, input_ids = (_upload(x, device) for x in (tokens.attention_mask, tokens.input_ids))
    # The padding as a 4D additive mask (0: attend, the dtype's minimum: padding), which transformers
    # uses as given: from a 2D mask it first checks for padding with a device-to-host read, which
    # made every training step wait for the GPU's queue. The same attention weights either way.
    dtype = next(text_encoder.parameters()).dtype
    additive = (1 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    hidden = text_encoder(input_ids, additive).last_hidden_state
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)


def _upload(x: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on `device` without making the host wait: a copy from pageable memory to a GPU
    waits for every kernel queued before it, one from pinned memory does not."""
    device = torch.device(device)
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def check_seed(seed) -> int:
    """`seed` as an int in [0, 2**63 - 1]; a negative seed means a fresh random one (as in the release)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise LIVEditorError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    if seed < 0:
        return random.SystemRandom().randrange(2**31)
    if seed > MAX_SEED:
        raise LIVEditorError(f"seed must be at most {MAX_SEED} (or negative for a random one), got {seed}")
    return seed


def check_guidance(guidance_scale) -> float:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise LIVEditorError(f"guidance scale must be a finite number, got {guidance_scale!r}")
    return float(guidance_scale)


def check_steps(num_inference_steps) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise LIVEditorError(f"number of inference steps must be a positive integer, got {num_inference_steps!r}")
    return num_inference_steps


@dataclass
class LIVEditorPipelineOutput(BaseOutput):
    """frames: the edited videos, one per prompt (np `[B, F, H, W, 3]` in [0, 1], a list of PIL
    lists, a `[B, F, 3, H, W]` tensor, or the latent; None on the ranks other than the first of a
    parallel run); fps: the frame rate to play them at; timings: seconds of text encoding, VAE
    encoding, denoising and VAE decoding."""

    frames: object
    fps: float
    timings: dict | None = None


def _elapsed(start: float, device) -> float:
    """Seconds since `start`, after the device's queued work (a fair wall-clock time on GPUs)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


# ----- geometry --------------------------------------------------------------------------------


def choose_bucket(height: int, width: int, buckets) -> tuple[int, int]:
    """The bucket whose aspect ratio (W/H) is nearest, in linear distance, to width/height, as the
    release picks it: the 14B buckets count as their exact ratios (16:9, 9:16, 1:1, 2:1, 1:2);
    first wins ties."""
    ratio = width / height
    return min((tuple(hw) for hw in buckets),
               key=lambda hw: abs(NOMINAL_ASPECT_RATIOS.get(hw, hw[1] / hw[0]) - ratio))


def snap_frame_count(num_frames: int, temporal_factor: int) -> int:
    """Largest count of the VAE's `k * temporal_factor + 1` form not above num_frames."""
    return (num_frames - 1) // temporal_factor * temporal_factor + 1


@dataclass(frozen=True)
class FrameFit:
    """How input frames of `source` size (height, width) are fitted to a `bucket`: resized to
    `resized` then centre-cropped (mode "crop"), or resized to `resized` and centred on black
    (mode "pad"); `content` is the (top, left, height, width) of the picture inside the bucket."""

    source: tuple[int, int]
    bucket: tuple[int, int]
    mode: str
    resized: tuple[int, int]
    content: tuple[int, int, int, int]

    @staticmethod
    def plan(source: tuple[int, int], bucket: tuple[int, int], mode: str = "crop") -> "FrameFit":
        if mode not in RESIZE_MODES:
            raise LIVEditorError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
        (h, w), (bh, bw) = source, bucket
        if (h, w) == (bh, bw):  # already fitted (e.g. a window of frames prepared by run_edit)
            return FrameFit(source, bucket, mode, bucket, (0, 0, bh, bw))
        if mode == "crop":
            # The release: scale to cover the bucket, round the size up to a multiple of 16, crop the centre.
            scale = max(bh / h, bw / w)
            new_h = max(bh, math.ceil(h * scale / RESIZE_MULTIPLE - 1e-9) * RESIZE_MULTIPLE)
            new_w = max(bw, math.ceil(w * scale / RESIZE_MULTIPLE - 1e-9) * RESIZE_MULTIPLE)
            return FrameFit(source, bucket, mode, (new_h, new_w), (0, 0, bh, bw))
        scale = min(bh / h, bw / w)
        new_h, new_w = min(bh, max(2, round(h * scale))), min(bw, max(2, round(w * scale)))
        return FrameFit(source, bucket, mode, (new_h, new_w), ((bh - new_h) // 2, (bw - new_w) // 2, new_h, new_w))

    def apply(self, frames: torch.Tensor) -> torch.Tensor:
        """`[F, 3, h, w]` float in [0, 1] of the source size -> `[F, 3, H, W]` of the bucket size."""
        (bh, bw), (new_h, new_w) = self.bucket, self.resized
        if (new_h, new_w) != tuple(frames.shape[2:]):
            frames = F.interpolate(frames, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        frames = frames.clamp(0.0, 1.0)
        if self.mode == "crop":
            top, left = (new_h - bh) // 2, (new_w - bw) // 2
            return frames[:, :, top : top + bh, left : left + bw]
        top, left, _, _ = self.content
        out = frames.new_zeros(frames.shape[0], 3, bh, bw)
        out[:, :, top : top + new_h, left : left + new_w] = frames
        return out

    def describe(self) -> str:
        (h, w), (bh, bw) = self.source, self.bucket
        if self.mode == "pad":
            if self.resized == self.bucket:
                return f"bucket {bw}x{bh}, no padding needed"
            return f"bucket {bw}x{bh}, {w}x{h} scaled to {self.resized[1]}x{self.resized[0]} and padded (written without the bars)"
        kept_h, kept_w = min(h, round(bh * h / self.resized[0])), min(w, round(bw * w / self.resized[1]))
        if (h, w) == (bh, bw):
            return f"bucket {bw}x{bh}, the input's own size"
        if (kept_h, kept_w) == (h, w):
            return f"bucket {bw}x{bh}, whole frame resized from {w}x{h}"
        return f"bucket {bw}x{bh}, centre crop of {kept_w}x{kept_h} from {w}x{h}"


def resize_center_crop(frames: torch.Tensor, height: int, width: int, chunk: int = 16) -> torch.Tensor:
    """Resize `[F, 3, h, w]` (float in [0, 1]) to cover height x width as the release does (bicubic
    with antialias, size rounded up to a multiple of 16), then crop the centre. In chunks of frames."""
    fit = FrameFit.plan(tuple(frames.shape[2:]), (height, width), "crop")
    return torch.cat([fit.apply(frames[i : i + chunk]) for i in range(0, frames.shape[0], chunk)])


def frames_to_tensor(video) -> torch.Tensor:
    """In-memory frames as float `[F, 3, H, W]` in [0, 1]: a list of PIL images or `[H, W, 3]`
    arrays, a numpy array `[F, H, W, 3]` or a torch tensor `[F, 3, H, W]`; uint8 values are 0..255,
    float values 0..1."""
    if isinstance(video, (list, tuple)):
        if not video:
            raise LIVEditorError("input video has no frames")
        video = np.stack([np.asarray(f.convert("RGB") if hasattr(f, "convert") else f) for f in video])
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"a numpy video must be [F, H, W, 3], got shape {video.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2)
    elif isinstance(video, torch.Tensor):
        if video.dim() != 4 or video.shape[1] != 3:
            raise ValueError(f"a tensor video must be [F, 3, H, W], got shape {tuple(video.shape)}")
        tensor = video.detach().cpu()
    else:
        raise ValueError(f"video must be a path, frames, a numpy array or a tensor, got {type(video).__name__}")
    if tensor.shape[0] == 0:
        raise LIVEditorError("input video has no frames")
    if tensor.shape[2] < 2 or tensor.shape[3] < 2:
        raise LIVEditorError(f"input video frames are too small ({tensor.shape[2]}x{tensor.shape[3]})")
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    if tensor.is_floating_point():
        return tensor.float()
    raise ValueError(f"video values must be uint8 or float in [0, 1], got {tensor.dtype}")


class LIVEditorPipeline(DiffusionPipeline):
    r"""Edit a video by an instruction with LIVEditor (in-context sparse attention).

    Components and the interface the pipeline uses (anything that offers it drops in):
        tokenizer: a transformers tokenizer; called as `tokenizer(texts, padding="max_length",
            max_length=L, truncation=True, add_special_tokens=True, return_attention_mask=True,
            return_tensors="pt")`.
        text_encoder: a transformers encoder (umT5 for the 14B model); called as
            `text_encoder(input_ids, attention_mask).last_hidden_state` with the padding as a 4D
            additive mask `[B, 1, 1, L]` (0 for tokens, the dtype's minimum for padding), which
            transformers encoders take as given; positions past the prompt are zeroed, as Wan does.
        vae: diffusers' `AutoencoderKLWan` interface: `encode(x).latent_dist` (its mode is used),
            `decode(z).sample`, `config.scale_factor_temporal` / `config.scale_factor_spatial`, and
            optional `config.latents_mean` / `config.latents_std` (per-channel normalisation).
        scheduler: a flow-matching scheduler (default: UniPC, flow_prediction, order 2, bh2, shift 6.0).
        transformer: `LIVEditorTransformer3DModel`.

    Load a saved folder with `LIVEditorPipeline.from_pretrained(folder)` (the generic
    `DiffusionPipeline.from_pretrained` does not know this class).

    Pipeline config (saved in model_index.json):
        resolution_buckets: list of (height, width); the input is fitted to the bucket of nearest
            aspect ratio (default: the 14B model's five buckets).
        fps: the model's frame rate (16): a video file is resampled to it and the output plays at it.
        max_sequence_length: text tokens (512 for umT5).
        max_num_frames: the model's window, in frames (81): one call edits at most this many
            (`liveditor.pipelines.edit.run_edit` covers longer videos in overlapping windows).
        default_num_inference_steps, default_guidance_scale: sampling defaults (32, 2.5).
        sigma_max: first unshifted sigma of the sampling grid handed to a flow scheduler (Wan's
            0.999, running linearly to 0); None keeps the scheduler's own grid.

    Memory: `enable_model_cpu_offload()` (keeps only the running component on the GPU) and
    `vae.enable_tiling()` let the 14B model edit on one 80 GB GPU.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        tokenizer,
        text_encoder,
        vae,
        scheduler,
        transformer: LIVEditorTransformer3DModel,
        resolution_buckets=LIVEDITOR_14B_BUCKETS,
        fps: float = 16.0,
        max_sequence_length: int = 512,
        max_num_frames: int = 81,
        default_num_inference_steps: int = 32,
        default_guidance_scale: float = 2.5,
        sigma_max: float | None = WAN_SIGMA_MAX,
    ):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
        )
        buckets = [tuple(int(v) for v in hw) for hw in resolution_buckets]
        if not buckets or any(len(hw) != 2 or min(hw) < 1 for hw in buckets):
            raise ValueError(f"resolution_buckets must be a non-empty list of (height, width), got {resolution_buckets}")
        if sigma_max is not None and not 0 < sigma_max <= 1:
            raise ValueError(f"sigma_max must be in (0, 1] or None, got {sigma_max}")
        self.register_to_config(
            resolution_buckets=[list(hw) for hw in buckets],
            fps=float(fps),
            max_sequence_length=max_sequence_length,
            max_num_frames=max_num_frames,
            default_num_inference_steps=int(default_num_inference_steps),
            default_guidance_scale=float(default_guidance_scale),
            sigma_max=None if sigma_max is None else float(sigma_max),
        )
        self._guidance_scale = 1.0
        self._num_timesteps = 0
        self._current_timestep = None
        self._interrupt = False
        self._attention_kwargs = None
        self._parallel_layout = None

    def enable_parallel(self, layout) -> None:
        """Run on the ranks of a `liveditor.pipelines.parallel.ParallelLayout` (CFG parallel x Ulysses;
        None: one process). Every rank of the layout calls the pipeline with the same arguments; the
        first encodes text and video, decodes and returns the frames, the others return None frames."""
        self._parallel_layout = layout
        self.transformer.enable_sequence_parallel(None if layout is None else layout.ulysses_group)
        if layout is not None and not layout.is_main:
            self.set_progress_bar_config(disable=True)

    # ----- diffusers-style state (readable from a step callback) --------------------------------

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """CFG runs whenever the scale is not 1 (as in the release)."""
        return self._guidance_scale != 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (e.g. from a step callback) to skip the remaining steps."""
        return self._interrupt

    @property
    def attention_kwargs(self):
        return self._attention_kwargs

    # ----- geometry ----------------------------------------------------------------------------

    @property
    def vae_scale_factor_temporal(self) -> int:
        return int(getattr(self.vae.config, "scale_factor_temporal", 4) or 4)

    @property
    def vae_scale_factor_spatial(self) -> int:
        return int(getattr(self.vae.config, "scale_factor_spatial", 8) or 8)

    @property
    def resolution_buckets(self) -> list[tuple[int, int]]:
        return [tuple(hw) for hw in self.config.resolution_buckets]

    def _check_resolution(self, height: int, width: int) -> None:
        _, p_h, p_w = self.transformer.config.patch_size
        step_h, step_w = self.vae_scale_factor_spatial * p_h, self.vae_scale_factor_spatial * p_w
        if (height, width) not in self.resolution_buckets:
            raise LIVEditorError(
                f"unsupported resolution {height}x{width}; this model edits at "
                + ", ".join(f"{h}x{w}" for h, w in self.resolution_buckets)
            )
        if height % step_h or width % step_w:
            raise LIVEditorError(f"resolution {height}x{width} is not a multiple of {step_h}x{step_w}")

    def plan_fit(self, source: tuple[int, int], height: int | None = None, width: int | None = None,
                 resize_mode: str = "crop") -> FrameFit:
        """How frames of `source` (height, width) are fitted: to the given bucket, or the bucket of
        nearest aspect ratio."""
        if (height is None) != (width is None):
            raise ValueError("give both height and width, or neither")
        if height is None:
            height, width = choose_bucket(source[0], source[1], self.resolution_buckets)
        self._check_resolution(height, width)
        return FrameFit.plan(source, (height, width), resize_mode)

    def prepare_video(self, video, height: int | None = None, width: int | None = None, num_frames: int | None = None,
                      resize_mode: str = "crop"):
        """The input as `[1, 3, F, H, W]` in [-1, 1] at a bucket resolution and a `k * t + 1` frame
        count, plus its `FrameFit`. A file is decoded as needed, resampled to the model's fps."""
        limit = self.config.max_num_frames if num_frames is None else num_frames
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise LIVEditorError(f"num_frames must be a positive integer, got {limit!r}")
        if isinstance(video, (str, Path)):
            from ..data.video_io import iter_video_frames, probe_video

            info = probe_video(video)
            fit = self.plan_fit((info.height, info.width), height, width, resize_mode)
            fitted = []  # each frame fitted as it is decoded: a large clip is never in memory whole
            for frame in iter_video_frames(video, fps=self.config.fps):
                fitted.append(fit.apply(frames_to_tensor(frame[None])))
                if len(fitted) == limit:
                    break
            frames = torch.cat(fitted)
        else:
            frames = frames_to_tensor(video)[:limit]
            fit = self.plan_fit(tuple(frames.shape[2:]), height, width, resize_mode)
            frames = torch.cat([fit.apply(frames[i : i + 8]) for i in range(0, frames.shape[0], 8)])
        count = snap_frame_count(frames.shape[0], self.vae_scale_factor_temporal)
        return (frames[:count] * 2.0 - 1.0).permute(1, 0, 2, 3).unsqueeze(0), fit

    # ----- text and latents --------------------------------------------------------------------

    def encode_prompt(self, prompt, negative_prompt=None, do_classifier_free_guidance: bool = True,
                      prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                      device=None, dtype=None):
        """(prompt_embeds, negative_prompt_embeds): `[B, L, D]` each; the negative ones only with
        CFG (default negative prompt: the release's). Given embeddings are used as they are."""
        device = self._execution_device if device is None else device
        dtype = self.transformer.dtype if dtype is None else dtype
        length = self.config.max_sequence_length
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = encode_instructions(self.tokenizer, self.text_encoder, prompts, length, device)
        batch = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative = WAN_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
            negatives = [negative] * batch if isinstance(negative, str) else list(negative)
            negative_prompt_embeds = encode_instructions(self.tokenizer, self.text_encoder, negatives, length, device)
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
        return prompt_embeds, negative_prompt_embeds if do_classifier_free_guidance else None

    def _latent_stats(self, z: torch.Tensor):
        cfg = self.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is None or std is None:
            return None
        shape = (1, z.shape[1], 1, 1, 1)
        return (torch.tensor(mean, device=z.device, dtype=z.dtype).view(shape),
                torch.tensor(std, device=z.device, dtype=z.dtype).view(shape))

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Normalised VAE latent (mode of the posterior) of `[1, 3, F, H, W]` in [-1, 1]."""
        z = self.vae.encode(video.to(device=self._execution_device, dtype=self.vae.dtype)).latent_dist.mode()
        stats = self._latent_stats(z)
        return z if stats is None else (z - stats[0]) / stats[1]

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """`[B, 3, F, H, W]` video in [-1, 1] from a normalised latent."""
        z = latents.to(device=self._execution_device, dtype=self.vae.dtype)
        stats = self._latent_stats(z)
        if stats is not None:
            z = z * stats[1] + stats[0]
        return torch.cat([self.vae.decode(z[i : i + 1]).sample for i in range(z.shape[0])])

    def sampling_settings(self, num_inference_steps: int | None = None, guidance_scale: float | None = None):
        """(steps, guidance) with None replaced by this folder's sampling defaults."""
        if num_inference_steps is None:
            num_inference_steps = self.config.default_num_inference_steps
        if guidance_scale is None:
            guidance_scale = self.config.default_guidance_scale
        return num_inference_steps, guidance_scale

    def set_sampling_timesteps(self, num_inference_steps: int, device=None) -> torch.Tensor:
        """Set the scheduler's timesteps: Wan's sigma grid (`sigma_max` config) for a flow-sigma
        scheduler, else the scheduler's own. Returns the timesteps."""
        sigma_max = self.config.get("sigma_max", WAN_SIGMA_MAX)
        if sigma_max is not None and getattr(self.scheduler.config, "use_flow_sigmas", False):
            self.scheduler.set_timesteps(device=device, sigmas=wan_sigmas(num_inference_steps, sigma_max))
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        return self.scheduler.timesteps

    def check_inputs(self, video, prompt, negative_prompt, num_inference_steps, guidance_scale, seed, generator,
                     latents, prompt_embeds, negative_prompt_embeds, output_type, callback_on_step_end_tensor_inputs):
        """Every argument check of `__call__`, before any work (user errors raise LIVEditorError)."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass prompt or prompt_embeds, not both")
        if prompt is None and prompt_embeds is None:
            raise LIVEditorError("the edit instruction is empty")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
            if any(not p.strip() for p in prompts):
                raise LIVEditorError("the edit instruction is empty")
            batch = len(prompts)
        else:
            if prompt_embeds.dim() != 3:
                raise ValueError(f"prompt_embeds must be [B, L, D], got shape {tuple(prompt_embeds.shape)}")
            batch = prompt_embeds.shape[0]
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            if not isinstance(negative_prompt, (list, tuple)) or len(negative_prompt) != batch or not all(
                    isinstance(p, str) for p in negative_prompt):
                raise ValueError(f"negative_prompt must be a string or a list of {batch} strings")
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] != batch:
            raise ValueError(f"negative_prompt_embeds must have batch size {batch}, got {negative_prompt_embeds.shape[0]}")
        check_steps(num_inference_steps)
        check_guidance(guidance_scale)
        if seed is not None:
            check_seed(seed)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError("generator must be one torch.Generator (its draws give every prompt its noise)")
        if latents is not None and (latents.dim() != 5 or latents.shape[0] != batch):
            raise ValueError(f"latents must be [{batch}, C, F, H, W], got shape {tuple(latents.shape)}")
        if output_type not in ("np", "pil", "pt", "latent"):
            raise ValueError(f"output_type must be np, pil, pt or latent, got {output_type!r}")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, got {unknown}")
        if video is None:
            raise ValueError("video is required: LIVEditor edits an input video")
        return batch

    # ----- call --------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        video=None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = DEFAULT_SEED,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        resize_mode: str = "crop",
    ):
        """Edit `video` as `prompt` says.

        Args:
            video: a path (mp4/mov/webm/gif...; decoded as needed and resampled to the model's fps),
                a list of frames, a numpy `[F, H, W, 3]` array or a tensor `[F, 3, H, W]` (uint8, or
                float in [0, 1]).
            prompt: the instruction, or a list of instructions: one edit of the same video each.
            negative_prompt: CFG negative prompt(s) (default: the release's, Wan's Chinese one).
            height, width: one of the pipeline's resolution buckets (default: the bucket of nearest
                aspect ratio, as the release picks it).
            num_frames: use at most this many input frames (default: `max_num_frames`), snapped
                down to the VAE's `k * t + 1` rule.
            num_inference_steps, guidance_scale: default: the folder's (32 and 2.5 for 14B); CFG
                runs whenever the scale is not 1.
            seed: noise seed (default 42, as the release; negative: random): float32 `randn` of the
                latent shape from a `torch.Generator` on the pipeline's device. `generator` wins.
            latents: the initial noise `[B, C, F', H', W']` instead.
            prompt_embeds, negative_prompt_embeds: precomputed text embeddings `[B, L, D]`.
            output_type: "np", "pil", "pt" or "latent".
            attention_kwargs: per-call attention overrides for the transformer
                ({"mode": "isa"|"dense", "isa_config": ISAConfig, "callback": fn}).
            callback_on_step_end: `fn(pipe, step, timestep, callback_kwargs) -> dict`, called after
                every step with the tensors named in `callback_on_step_end_tensor_inputs` (among
                `_callback_tensor_inputs`); returned tensors replace them. Set `pipe._interrupt`
                to stop early (the remaining steps are skipped and the current latent decoded).
            resize_mode: "crop" (cover the bucket, crop the centre) or "pad" (fit inside it, black
                bars, removed again from the output).
        """
        num_inference_steps, guidance_scale = self.sampling_settings(num_inference_steps, guidance_scale)
        batch = self.check_inputs(video, prompt, negative_prompt, num_inference_steps, guidance_scale, seed,
                                  generator, latents, prompt_embeds, negative_prompt_embeds, output_type,
                                  callback_on_step_end_tensor_inputs)
        self._guidance_scale = float(guidance_scale)
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        dtype = self.transformer.dtype
        layout = self._parallel_layout
        main = layout is None or layout.is_main
        timings = {}

        if main:  # in a parallel run, the first rank encodes and shares the results
            start = time.perf_counter()
            pixels, fit = self.prepare_video(video, height, width, num_frames, resize_mode)
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                prompt, negative_prompt, self.do_classifier_free_guidance, prompt_embeds, negative_prompt_embeds,
                device, dtype)
            timings["text_encoder_s"] = _elapsed(start, device)
            start = time.perf_counter()
            context = self.encode_video(pixels).to(device=device, dtype=torch.float32)
            timings["vae_encode_s"] = _elapsed(start, device)
            shape = (batch, *context.shape[1:])
            if latents is None:
                if generator is None:
                    generator = torch.Generator(device=device).manual_seed(
                        check_seed(DEFAULT_SEED if seed is None else seed))
                latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
            elif tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape} for this video, got {tuple(latents.shape)}")
        if layout is not None:
            from .parallel import broadcast_from_main

            shared = None
            if main:
                shared = dict(fit=fit, latents=latents, context=context, prompt_embeds=prompt_embeds,
                              negative_prompt_embeds=negative_prompt_embeds)
                shared = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in shared.items()}
            shared = broadcast_from_main(layout, shared)
            fit, latents, context = shared["fit"], shared["latents"], shared["context"]
            prompt_embeds = shared["prompt_embeds"].to(device=device, dtype=dtype)
            negative_prompt_embeds = shared["negative_prompt_embeds"]
            if negative_prompt_embeds is not None:
                negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
        latents = latents.to(device=device, dtype=torch.float32)
        context = context.to(device=device, dtype=dtype).expand(batch, *context.shape[1:])

        from .parallel import guided_flow

        timesteps = self.set_sampling_timesteps(num_inference_steps, device)
        self._num_timesteps = len(timesteps)
        start = time.perf_counter()
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                model_input = latents.to(dtype)
                step_t = t.expand(batch)

                def predict(embeds):
                    return self.transformer(
                        model_input, step_t, embeds, context, attention_kwargs=attention_kwargs, return_dict=False
                    )[0]

                flow = guided_flow(predict, prompt_embeds,
                                   negative_prompt_embeds if self.do_classifier_free_guidance else None,
                                   guidance_scale, layout)
                latents = self.scheduler.step(flow.float(), t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds,
                               "negative_prompt_embeds": negative_prompt_embeds}
                    callback_kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress.update()
        self._current_timestep = None
        timings["denoise_s"] = _elapsed(start, device)

        if not main:
            frames = None
        elif output_type == "latent":
            frames = latents
        else:
            start = time.perf_counter()
            video_out = self.decode_latents(latents).float().clamp(-1.0, 1.0)
            video_out = ((video_out + 1.0) / 2.0).permute(0, 2, 1, 3, 4).cpu()  # [B, F, 3, H, W] in [0, 1]
            timings["vae_decode_s"] = _elapsed(start, device)
            top, left, h, w = fit.content
            video_out = video_out[:, :, :, top : top + h, left : left + w]
            if output_type == "pt":
                frames = video_out
            else:
                frames = video_out.permute(0, 1, 3, 4, 2).numpy()
                if output_type == "pil":
                    from PIL import Image

                    frames = [[Image.fromarray((f * 255 + 0.5).astype(np.uint8)) for f in clip] for clip in frames]
        self.maybe_free_model_hooks()
        fps = float(self.config.fps)
        if not return_dict:
            return (frames, fps)
        return LIVEditorPipelineOutput(frames=frames, fps=fps, timings=timings)
