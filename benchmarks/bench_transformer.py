"""Seconds per denoising step of the LIVEditor transformer: dense attention vs ISA.

One denoising step = two transformer forwards (the CFG text and negative branches, both with the
context video). Default: the liveditor-14b architecture with random bf16 weights at 544x960,
61 frames (32,640 tokens per segment, 65,280 in the in-context sequence) and Wan's 512 text tokens.
The dense baseline uses the fastest PyTorch SDPA backend found at that shape. Also times the
attention operator alone and the share of the step spent in self-attention.

    python benchmarks/bench_transformer.py --json out.json
    python benchmarks/bench_transformer.py --preset liveditor-tiny --height 64 --width 64 --frames 9 --device cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from liveditor.isa import ISAConfig, isa_attention
from liveditor.models import LIVEditorTransformer3DModel

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats=1):
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def fastest_sdpa_backend(heads, tokens, head_dim, dtype, device):
    """Time each SDPA backend on one self-attention call of the benchmark's shape."""
    q, k, v = (torch.randn(1, heads, tokens, head_dim, dtype=dtype, device=device) for _ in range(3))
    candidates = ["flash", "cudnn"] if device.type == "cuda" else ["math"]
    times = {}
    for name in candidates:
        try:
            with sdpa_kernel([SDPA_BACKENDS[name]]):
                torch.nn.functional.scaled_dot_product_attention(q, k, v)  # warm-up
                times[name] = _time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device, 2)
        except RuntimeError as exc:
            times[name] = None
            print(f"SDPA backend {name} unavailable: {str(exc).splitlines()[0]}")
    usable = {k: t for k, t in times.items() if t is not None}
    best = min(usable, key=usable.get)
    isa_cfg = ISAConfig()
    isa_attention(q, k, v, tokens // 2, isa_cfg)  # warm-up / kernel compilation
    isa_time = _time(lambda: isa_attention(q, k, v, tokens // 2, isa_cfg), device, 2)
    del q, k, v
    return best, times, isa_time


def build_model(preset, dtype, device, seed):
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # create weights directly in the target dtype (14B fits only so)
    try:
        with torch.device(device):
            model = LIVEditorTransformer3DModel.from_preset(preset)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="liveditor-14b")
    parser.add_argument("--height", type=int, default=544)
    parser.add_argument("--width", type=int, default=960)
    parser.add_argument("--frames", type=int, default=61)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1, help="timed denoising steps per mode")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    model = build_model(args.preset, dtype, device, args.seed)
    cfg = model.config
    latent_shape = (1, cfg.in_channels, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    grid = (latent_shape[2] // cfg.patch_size[0], latent_shape[3] // cfg.patch_size[1], latent_shape[4] // cfg.patch_size[2])
    tokens_per_segment = math.prod(grid)
    g = torch.Generator(device=device).manual_seed(args.seed)
    latents = torch.randn(latent_shape, generator=g, device=device, dtype=dtype)
    context = torch.randn(latent_shape, generator=g, device=device, dtype=dtype)
    text = torch.randn(1, args.text_tokens, cfg.text_dim, generator=g, device=device, dtype=dtype)
    negative = torch.randn(1, args.text_tokens, cfg.text_dim, generator=g, device=device, dtype=dtype)
    timestep = torch.tensor([900.0], device=device)

    best_sdpa, sdpa_times, isa_op_time = fastest_sdpa_backend(
        cfg.num_attention_heads, 2 * tokens_per_segment, cfg.attention_head_dim, dtype, device
    )
    print(f"attention op alone ({2 * tokens_per_segment} tokens): "
          + ", ".join(f"{k} {v:.4f}s" for k, v in sdpa_times.items() if v is not None)
          + f", isa {isa_op_time:.4f}s", flush=True)

    def step():
        out = model(latents, timestep, text, context, return_dict=False)[0]
        out_neg = model(latents, timestep, negative, context, return_dict=False)[0]
        return out_neg + 2.5 * (out - out_neg)

    rows = []
    timer = model.attention_timer
    for mode in ("dense", "isa"):
        model.set_attention_mode(mode)
        with sdpa_kernel([SDPA_BACKENDS[best_sdpa]]):
            if mode == "isa":  # compiles the Triton kernels at this shape; SDPA was warmed above
                warm_s = _time(lambda: model(latents, timestep, text, context, return_dict=False), device)
                print(f"isa warm-up forward (kernel compilation included): {warm_s:.2f} s", flush=True)
            timer.reset()
            timer.enabled = True
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                prediction = step()
            _sync(device)
            seconds = (time.perf_counter() - start) / args.steps
            timer.enabled = False
            finite = bool(torch.isfinite(prediction).all())
            del prediction
        attention_seconds = timer.seconds / args.steps
        rows.append(dict(mode=mode, seconds_per_step=seconds, attention_seconds_per_step=attention_seconds,
                         attention_share=attention_seconds / seconds, projected_32_step_edit_s=32 * seconds,
                         output_finite=finite))
        print(f"{mode}: {seconds:.3f} s/step, attention {attention_seconds:.3f} s, finite output: {finite}", flush=True)

    dense, isa = rows
    speedup = dense["seconds_per_step"] / isa["seconds_per_step"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    result = dict(
        benchmark="bench_transformer",
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        commit=commit,
        device=device_name,
        torch=torch.__version__,
        preset=args.preset,
        dtype=str(dtype).replace("torch.", ""),
        video=f"{args.height}x{args.width}x{args.frames}",
        latent=list(latent_shape),
        tokens_per_segment=tokens_per_segment,
        sequence_tokens=2 * tokens_per_segment,
        text_tokens=args.text_tokens,
        isa_config=dict(ISAConfig().__dict__),
        dense_sdpa_backend=best_sdpa,
        attention_op_seconds={**{f"sdpa_{k}": v for k, v in sdpa_times.items()}, "isa": isa_op_time},
        attention_op_speedup=sdpa_times[best_sdpa] / isa_op_time,
        rows=rows,
        step_speedup=speedup,
        peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    )

    print()
    print(f"{result['device']}  {args.preset} {result['dtype']}  {result['video']} -> {2 * tokens_per_segment} tokens, "
          f"dense SDPA backend: {best_sdpa}")
    print(f"{'mode':<6} {'s/step':>9} {'attn s/step':>12} {'attn share':>11} {'32-step edit':>13}")
    for r in rows:
        print(f"{r['mode']:<6} {r['seconds_per_step']:>9.3f} {r['attention_seconds_per_step']:>12.3f} "
              f"{100 * r['attention_share']:>10.1f}% {r['projected_32_step_edit_s'] / 60:>10.2f} min")
    print(f"ISA speedup per step: {speedup:.2f}x; attention op alone: {result['attention_op_speedup']:.2f}x")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
