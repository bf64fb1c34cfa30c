"""What bench_transformer.py and bench_parallel.py share: the benchmark's video shape on the command
line, a random model of a preset, the inputs of one denoising step, SDPA backend timing and the
run's metadata. Both scripts import it from their own folder."""

from __future__ import annotations

import datetime
import math
import platform
import subprocess
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from liveditor.models import LIVEditorTransformer3DModel

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def add_shape_arguments(parser) -> None:
    """The model and video shape of a step (default: LIVEditor-14B at 544x960, 61 frames, 512 text
    tokens), dtype, device and seed."""
    parser.add_argument("--preset", default="liveditor-14b")
    parser.add_argument("--height", type=int, default=544)
    parser.add_argument("--width", type=int, default=960)
    parser.add_argument("--frames", type=int, default=61)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--seed", type=int, default=0)


def step_dtype(args, device: torch.device) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    """Mean seconds of `repeats` calls of `fn`, the device synchronised around them."""
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def build_model(preset: str, dtype: torch.dtype, device, seed: int) -> LIVEditorTransformer3DModel:
    """The preset's transformer with seeded random weights made directly on `device` in `dtype`
    (14B fits only so), in eval mode without gradients."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LIVEditorTransformer3DModel.from_preset(preset)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def video_latent(args) -> tuple[int, int, int]:
    """(frames, rows, columns) of the Wan-VAE latent of the benchmark's video."""
    return (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8


def segment_tokens(cfg, latent: tuple[int, int, int]) -> int:
    """Tokens of one segment (source or context) of this latent."""
    return math.prod(n // p for n, p in zip(latent, cfg.patch_size))


def step_inputs(cfg, latent: tuple[int, int, int], text_tokens: int, dtype, device, seed: int):
    """(noisy latent, context latent, text and negative-text embeddings, timestep) of one step."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (1, cfg.in_channels, *latent)
    latents = torch.randn(shape, generator=g, device=device, dtype=dtype)
    context = torch.randn(shape, generator=g, device=device, dtype=dtype)
    text = torch.randn(1, text_tokens, cfg.text_dim, generator=g, device=device, dtype=dtype)
    negative = torch.randn(1, text_tokens, cfg.text_dim, generator=g, device=device, dtype=dtype)
    return latents, context, text, negative, torch.tensor([900.0], device=device)


def sdpa_times(heads: int, tokens: int, head_dim: int, dtype, device, candidates=("flash", "cudnn")) -> dict:
    """Seconds of one self-attention call of this shape per SDPA backend (None: the backend refused;
    on the CPU only "math")."""
    q, k, v = (torch.randn(1, heads, tokens, head_dim, dtype=dtype, device=device) for _ in range(3))
    times = {}
    for name in candidates if device.type == "cuda" else ("math",):
        try:
            with sdpa_kernel([SDPA_BACKENDS[name]]):
                torch.nn.functional.scaled_dot_product_attention(q, k, v)  # warm-up
                times[name] = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device, 2)
        except RuntimeError as exc:
            times[name] = None
            print(f"SDPA backend {name} unavailable: {str(exc).splitlines()[0]}", flush=True)
    return times


def fastest(times: dict) -> str:
    usable = {name: t for name, t in times.items() if t is not None}
    return min(usable, key=usable.get)


def run_metadata(device: torch.device) -> dict:
    """Date, commit, card and versions of a run."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        commit=commit,
        device=device_name,
        torch=torch.__version__,
        triton=triton_version,
    )
