"""LIVEditorPipeline: instruction-guided video editing with the in-context LIVEditor transformer."""

from __future__ import annotations

import html
import math
import re
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

# Wan's standard negative prompt (its shared inference config); kept in the original Chinese, the
# language the umT5 negative branch was trained with.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# (height, width) buckets of LIVEditor-14B (spec section 3).
LIVEDITOR_14B_BUCKETS = ((544, 960), (960, 544), (720, 720), (480, 960), (960, 480))
DEFAULT_FLOW_SHIFT = 6.0


def flow_unipc_scheduler(flow_shift: float = DEFAULT_FLOW_SHIFT) -> UniPCMultistepScheduler:
    """diffusers' UniPC solver in flow-matching mode, as Wan uses it, with LIVEditor's shift."""
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
        solver_order=2,
        solver_type="bh2",
    )


def encode_instructions(tokenizer, text_encoder, prompts: list[str], max_length: int, device=None) -> torch.Tensor:
    """Instruction embeddings as LIVEditor uses them (at inference and in training): fixed-length
    tokens through `text_encoder(...).last_hidden_state`, positions past the prompt zeroed (Wan's
    convention). `device`: where the tokens go (default: the text encoder's)."""
    device = next(text_encoder.parameters()).device if device is None else device
    tokens = tokenizer(
        [_clean_prompt(p) for p in prompts],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    mask = tokens.attention_mask.to(device)
    hidden = text_encoder(tokens.input_ids.to(device), mask).last_hidden_state
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)


@dataclass
class LIVEditorPipelineOutput(BaseOutput):
    """frames: the edited video, batch first (np `[1, F, H, W, 3]` in [0, 1], a list of PIL lists,
    a `[1, F, 3, H, W]` tensor, or the latent); fps: the frame rate to play it at."""

    frames: object
    fps: float


def _clean_prompt(text: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


def choose_bucket(height: int, width: int, buckets) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log scale) to height/width; first wins ties."""
    ratio = math.log(height / width)
    return min(buckets, key=lambda hw: abs(math.log(hw[0] / hw[1]) - ratio))


def snap_frame_count(num_frames: int, temporal_factor: int) -> int:
    """Largest count of the VAE's `k * temporal_factor + 1` form not above num_frames."""
    return (num_frames - 1) // temporal_factor * temporal_factor + 1


def resize_center_crop(frames: torch.Tensor, height: int, width: int, chunk: int = 16) -> torch.Tensor:
    """Resize `[F, 3, h, w]` (float) so it covers height x width, then crop the centre."""
    _, _, h, w = frames.shape
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    top, left = (new_h - height) // 2, (new_w - width) // 2
    out = []
    for start in range(0, frames.shape[0], chunk):
        part = frames[start : start + chunk]
        if (new_h, new_w) != (h, w):
            part = F.interpolate(part, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        out.append(part[:, :, top : top + height, left : left + width])
    return torch.cat(out).clamp_(0.0, 1.0)


def video_to_tensor(video) -> tuple[torch.Tensor, float | None]:
    """Any accepted video input as float `[F, 3, H, W]` in [0, 1], and its fps when known.

    Accepted: a file path; a list of PIL images or `[H, W, 3]` arrays; a numpy array `[F, H, W, 3]`;
    a torch tensor `[F, 3, H, W]`. uint8 values are 0..255, float values 0..1.
    """
    fps = None
    if isinstance(video, (str, Path)):
        from ..data.video_io import read_video

        clip = read_video(video)
        video, fps = clip.frames, clip.fps
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
        tensor = tensor.float() / 255.0
    elif tensor.is_floating_point():
        tensor = tensor.float()
    else:
        raise ValueError(f"video values must be uint8 or float in [0, 1], got {tensor.dtype}")
    return tensor, fps


class LIVEditorPipeline(DiffusionPipeline):
    r"""Edit a video by an instruction with LIVEditor (in-context sparse attention).

    Components and the interface the pipeline uses (anything that offers it drops in):
        tokenizer: a transformers tokenizer; called as `tokenizer(texts, padding="max_length",
            max_length=L, truncation=True, add_special_tokens=True, return_attention_mask=True,
            return_tensors="pt")`.
        text_encoder: a transformers encoder (umT5 for the 14B model); called as
            `text_encoder(input_ids, attention_mask).last_hidden_state`; positions past the prompt
            are zeroed, as Wan does.
        vae: diffusers' `AutoencoderKLWan` interface: `encode(x).latent_dist` (its mode is used),
            `decode(z).sample`, `config.scale_factor_temporal` / `config.scale_factor_spatial`, and
            optional `config.latents_mean` / `config.latents_std` (per-channel normalisation).
        scheduler: a flow-matching scheduler (default: UniPC, flow_prediction, shift 6.0).
        transformer: `LIVEditorTransformer3DModel`.

    Load a saved folder with `LIVEditorPipeline.from_pretrained(folder)` (the generic
    `DiffusionPipeline.from_pretrained` does not know this class).

    Pipeline config (saved in model_index.json):
        resolution_buckets: list of (height, width); the input is resized to cover the bucket with
            the nearest aspect ratio and centre-cropped (default: the 14B model's five buckets).
        fps: frame rate of the output (16).
        max_sequence_length: text tokens (512 for umT5).
        max_num_frames: longest input used, in frames (81); longer inputs are cut.

    Memory: `enable_model_cpu_offload()` (keeps only the running component on the GPU) and
    `vae.enable_tiling()` let the 14B model edit on one 80 GB GPU.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"

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
    ):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
        )
        buckets = [tuple(int(v) for v in hw) for hw in resolution_buckets]
        if not buckets or any(len(hw) != 2 or min(hw) < 1 for hw in buckets):
            raise ValueError(f"resolution_buckets must be a non-empty list of (height, width), got {resolution_buckets}")
        self.register_to_config(
            resolution_buckets=[list(hw) for hw in buckets],
            fps=float(fps),
            max_sequence_length=max_sequence_length,
            max_num_frames=max_num_frames,
            default_num_inference_steps=int(default_num_inference_steps),
            default_guidance_scale=float(default_guidance_scale),
        )

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

    def prepare_video(self, video, height: int | None = None, width: int | None = None, num_frames: int | None = None):
        """The input as `[1, 3, F, H, W]` in [-1, 1] at a bucket resolution and a 4k+1 frame count,
        plus the input's fps (None when unknown)."""
        frames, fps = video_to_tensor(video)
        if (height is None) != (width is None):
            raise ValueError("give both height and width, or neither")
        if height is None:
            height, width = choose_bucket(frames.shape[2], frames.shape[3], self.resolution_buckets)
        self._check_resolution(height, width)
        limit = self.config.max_num_frames if num_frames is None else num_frames
        if limit < 1:
            raise ValueError(f"num_frames must be at least 1, got {limit}")
        count = snap_frame_count(min(frames.shape[0], limit), self.vae_scale_factor_temporal)
        frames = resize_center_crop(frames[:count], height, width)
        return (frames * 2.0 - 1.0).permute(1, 0, 2, 3).unsqueeze(0), fps

    # ----- text and latents --------------------------------------------------------------------

    def _encode_text(self, texts: list[str], device, dtype) -> torch.Tensor:
        hidden = encode_instructions(self.tokenizer, self.text_encoder, texts, self.config.max_sequence_length, device)
        return hidden.to(device=device, dtype=dtype)

    def encode_prompt(self, prompt: str, negative_prompt: str | None, do_cfg: bool, device, dtype):
        """Text embeddings of the instruction and (with CFG) of the negative prompt."""
        texts = [prompt] + ([WAN_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt] if do_cfg else [])
        embeds = self._encode_text(texts, device, dtype)
        return embeds[:1], (embeds[1:] if do_cfg else None)

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
        """`[1, 3, F, H, W]` video in [-1, 1] from a normalised latent."""
        z = latents.to(device=self._execution_device, dtype=self.vae.dtype)
        stats = self._latent_stats(z)
        if stats is not None:
            z = z * stats[1] + stats[0]
        return self.vae.decode(z).sample

    def sampling_settings(self, num_inference_steps: int | None = None, guidance_scale: float | None = None):
        """(steps, guidance) with None replaced by this folder's sampling defaults."""
        if num_inference_steps is None:
            num_inference_steps = self.config.default_num_inference_steps
        if guidance_scale is None:
            guidance_scale = self.config.default_guidance_scale
        return num_inference_steps, guidance_scale

    # ----- call --------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        video,
        prompt: str,
        negative_prompt: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "np",
        attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ):
        """Edit `video` as `prompt` says.

        Args:
            video: a path (mp4/mov/webm/gif...), a list of frames, a numpy `[F, H, W, 3]` array or a
                tensor `[F, 3, H, W]` (uint8 0..255 or float 0..1).
            prompt: the edit instruction.
            negative_prompt: the CFG negative branch (None: Wan's standard negative prompt).
            num_inference_steps: solver steps (None: the folder's `default_num_inference_steps`,
                32 for LIVEditor-14B).
            guidance_scale: text-only classifier-free guidance (None: the folder's
                `default_guidance_scale`, 2.5 for LIVEditor-14B); the context video is in both
                branches. 1 or less disables CFG.
            height, width: output size, one of the pipeline's resolution buckets (default: the bucket
                with the nearest aspect ratio).
            num_frames: use at most this many input frames (snapped down to the VAE's 4k+1 rule).
            seed / generator: noise seed (a generator wins over a seed).
            output_type: "np", "pil", "pt" or "latent".
            attention_kwargs: per-call attention overrides for the transformer
                ({"mode": "isa"|"dense", "isa_config": ISAConfig}).
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise LIVEditorError("the edit instruction is empty")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError("negative_prompt must be a string")
        num_inference_steps, guidance_scale = self.sampling_settings(num_inference_steps, guidance_scale)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if output_type not in ("np", "pil", "pt", "latent"):
            raise ValueError(f"output_type must be np, pil, pt or latent, got {output_type!r}")
        device = self._execution_device
        if generator is None and seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(int(seed))

        pixels, _ = self.prepare_video(video, height, width, num_frames)
        do_cfg = guidance_scale > 1.0
        dtype = self.transformer.dtype
        prompt_embeds, negative_embeds = self.encode_prompt(prompt, negative_prompt, do_cfg, device, dtype)

        context = self.encode_video(pixels).to(device=device, dtype=torch.float32)
        latents = randn_tensor(context.shape, generator=generator, device=device, dtype=torch.float32)
        context = context.to(dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=len(timesteps)) as progress:
            for t in timesteps:
                model_input = latents.to(dtype)
                step_t = t.expand(latents.shape[0])
                flow = self.transformer(
                    model_input, step_t, prompt_embeds, context, attention_kwargs=attention_kwargs, return_dict=False
                )[0]
                if do_cfg:
                    flow_uncond = self.transformer(
                        model_input, step_t, negative_embeds, context, attention_kwargs=attention_kwargs,
                        return_dict=False,
                    )[0]
                    flow = flow_uncond + guidance_scale * (flow - flow_uncond)
                latents = self.scheduler.step(flow.float(), t, latents, return_dict=False)[0]
                progress.update()

        if output_type == "latent":
            frames = latents
        else:
            video_out = self.decode_latents(latents).float().clamp(-1.0, 1.0)
            video_out = ((video_out + 1.0) / 2.0).permute(0, 2, 1, 3, 4).cpu()  # [1, F, 3, H, W] in [0, 1]
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
        return LIVEditorPipelineOutput(frames=frames, fps=fps)
