#!/usr/bin/env python
"""ISA (Triton backend) against the dense attention kernels on one CUDA GPU.

Prints a table and writes JSON: milliseconds per call (median over many calls, CUDA events, after
warm-up), speedup over each dense backend present, effective TFLOP/s (dense-equivalent FLOPs over
time) and ISA's own FLOP fraction, a per-stage time breakdown of the ISA forward, the backward
(dense vs ISA) and ISA's extra memory.

    python benchmarks/bench_isa.py --json out/bench_isa.json            # everything
    python benchmarks/bench_isa.py --quick                               # headline shape only

Shapes: LIVEditor-14B 544x960 61 frames (B=1, H=40, D=128, L_src=L_ctx=32640), Wan 1.3B 480p 81
frames (H=12, 32760 each), Wan 720p 81 frames (H=40, 75600 each), and a sweep of N at H=40.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import statistics
import subprocess
import sys

import torch

from liveditor.atomic import write_json
from liveditor.isa import ISAConfig
from liveditor.isa import ops
from liveditor.isa.config import block_counts
from liveditor.isa.dense_kernels import (
    available_dense_kernels,
    choose_dense_kernel,
    dense_exact_attention,
    dense_kernel_choices,
    run_dense_kernel,
)
from liveditor.isa.layout import block_means
from liveditor.isa.reference import isa_attention_torch
from liveditor.isa.triton_sparse import sparse_forward

SHAPES = {
    "liveditor14b_544x960x61": (1, 40, 32640, 32640, 128),
    "wan1.3b_480p_81f": (1, 12, 32760, 32760, 128),
    "wan_720p_81f": (1, 40, 75600, 75600, 128),
}
SWEEP = [8192, 16384, 32768, 65536, 131072]
HEADLINE = "liveditor14b_544x960x61"


def timed(fn, target_ms: float = 1500.0, min_reps: int = 3, max_reps: int = 100) -> float:
    """Median milliseconds of fn() over repeated calls, after two warm-up calls."""
    fn()
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    stop.record()
    stop.synchronize()
    reps = int(min(max_reps, max(min_reps, target_ms / max(start.elapsed_time(stop), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for begin, end in events:
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(begin.elapsed_time(end) for begin, end in events)


def dense_forward(name, q, k, v):
    return lambda: run_dense_kernel(name, q, k, v)


def dense_fwd_bwd(name, q, k, v, grad):
    def run():
        q.grad = k.grad = v.grad = None
        run_dense_kernel(name, q, k, v).backward(grad)

    return run


def isa_forward(q, k, v, num_source, config, dense_kernel):
    def run():
        with torch.no_grad():
            ops.isa_attention_triton(q, k, v, num_source, config, scale=q.shape[-1] ** -0.5, dense_kernel=dense_kernel)

    return run


def isa_fwd_bwd(q, k, v, num_source, config, grad, dense_kernel):
    def run():
        q.grad = k.grad = v.grad = None
        out = ops.isa_attention_triton(q, k, v, num_source, config, scale=q.shape[-1] ** -0.5,
                                       dense_kernel=dense_kernel)
        out.backward(grad)

    return run


def stage_breakdown(q, k, v, num_source, config, dense_kernel) -> dict:
    """Forward time of each ISA stage, each timed on its own (same inputs, same decisions)."""
    B, H, N, D = q.shape
    b = config.block_size
    scale = D ** -0.5
    counts = block_counts(num_source, N - num_source, config)
    n_full = counts.num_full
    stages = {}
    with torch.no_grad():
        stages["pooling"] = timed(lambda: [block_means(x, num_source, b) for x in (q, k, v)])
        plan_ms = timed(lambda: ops.plan_isa(q, k, v, num_source, config, scale))
        stages["scoring+selection"] = plan_ms - stages["pooling"]
        plan = ops.plan_isa(q, k, v, num_source, config, scale)
        masked = (N - num_source) % b != 0
        name = choose_dense_kernel(q, masked, setting=dense_kernel)
        common = (q, k, v, plan.pooled_k, plan.pooled_v, plan.kept32, plan.query_order, plan.exact_lists,
                  plan.exact_mask)
        if name != "triton":
            exact_all = timed(lambda: ops.exact_group_dense(q, k, v, plan.query_order, plan.selected32, num_source,
                                                            b, n_full, scale, name))
            exact_out = ops.exact_group_dense(q, k, v, plan.query_order, plan.selected32, num_source, b, n_full,
                                              scale, name)
            # The dense kernel alone, on inputs of the same shapes (no key mask): the rest of exact_all
            # is the gather (and the mask, if any).
            q_ex = q[:, :, : n_full * b].contiguous()
            kv_len = num_source + counts.num_selected * b
            k_ex, v_ex = k[:, :, :kv_len].contiguous(), v[:, :, :kv_len].contiguous()
            stages["exact group"] = timed(lambda: dense_exact_attention(name, q_ex, k_ex, v_ex, None, scale))
            stages["gather"] = max(0.0, exact_all - stages["exact group"])
            stages["taylor group"] = timed(lambda: sparse_forward(*common, exact_out, num_source, b, n_full, scale,
                                                                  stages=("attend",)))
            stages["scatter"] = timed(lambda: sparse_forward(*common, exact_out, num_source, b, n_full, scale,
                                                             stages=("scatter",)))
            stages["dense kernel"] = name
        else:
            dummy = torch.empty(B, H, n_full * b, D, device=q.device, dtype=q.dtype)
            both = timed(lambda: sparse_forward(*common, None, num_source, b, n_full, scale))
            stages["taylor group"] = timed(lambda: sparse_forward(*common, dummy, num_source, b, n_full, scale,
                                                                  stages=("attend",)))
            stages["exact group"] = both - stages["taylor group"]
            stages["gather"] = 0.0
            stages["scatter"] = 0.0
            stages["dense kernel"] = "triton"
    return stages


def extra_memory(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def bench_shape(name, B, H, L_src, L_ctx, D, config, dtype, backward: bool, breakdown: bool,
                dense_kernels=("auto",)) -> dict:
    N = L_src + L_ctx
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    dense_flops = 4.0 * B * H * N * N * D
    row = dict(shape=name, B=B, H=H, L_src=L_src, L_ctx=L_ctx, D=D, N=N, dtype=str(dtype).replace("torch.", ""),
               dense_fwd_tflop=dense_flops / 1e12, dense_fwd_ms={}, isa_fwd_ms={})
    for backend in available_dense_kernels(masked=False):
        try:
            row["dense_fwd_ms"][backend] = timed(dense_forward(backend, q, k, v))
        except RuntimeError as exc:
            row["dense_fwd_ms"][backend] = None
            print(f"  {name}: dense {backend} failed: {str(exc).splitlines()[0]}", file=sys.stderr)
    for dense_kernel in dense_kernels:
        row["isa_fwd_ms"][dense_kernel] = timed(isa_forward(q, k, v, L_src, config, dense_kernel))
    with torch.no_grad():
        _, info = ops.isa_attention_triton(q, k, v, L_src, config, scale=D ** -0.5, return_info=True,
                                           dense_kernel=dense_kernels[0])
    row["flop_fraction"] = info.flop_fraction
    row["exact_group_kernel"] = choose_dense_kernel(q, masked=L_ctx % config.block_size != 0,
                                                    setting=dense_kernels[0])
    isa_ms = row["isa_fwd_ms"][dense_kernels[0]]
    dense_ok = {b_: ms for b_, ms in row["dense_fwd_ms"].items() if ms}
    row["speedup_fwd"] = {b_: ms / isa_ms for b_, ms in dense_ok.items()}
    row["fastest_dense"] = min(dense_ok, key=dense_ok.get) if dense_ok else None
    row["isa_effective_tflops"] = dense_flops / isa_ms / 1e9
    row["isa_actual_tflops"] = info.flop_fraction * dense_flops / isa_ms / 1e9
    row["dense_tflops"] = {b_: dense_flops / ms / 1e9 for b_, ms in dense_ok.items()}
    row["isa_extra_memory_bytes"] = extra_memory(isa_forward(q, k, v, L_src, config, dense_kernels[0]))
    row["qkv_bytes_each"] = q.numel() * q.element_size()
    if breakdown:
        row["stages_ms"] = stage_breakdown(q, k, v, L_src, config, dense_kernels[0])
        attention = row["stages_ms"]["exact group"] + row["stages_ms"]["taylor group"]
        others = sum(v_ for k_, v_ in row["stages_ms"].items() if isinstance(v_, float)) - attention
        row["other_stages_fraction"] = others / isa_ms
    if backward:
        grad = torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=gen)
        for x in (q, k, v):
            x.requires_grad_(True)
        row["dense_bwd_ms"] = {}
        for backend in dense_ok:
            try:
                row["dense_bwd_ms"][backend] = timed(dense_fwd_bwd(backend, q, k, v, grad)) - dense_ok[backend]
            except RuntimeError as exc:
                print(f"  {name}: dense {backend} backward failed: {str(exc).splitlines()[0]}", file=sys.stderr)
        row["isa_bwd_ms"] = timed(isa_fwd_bwd(q, k, v, L_src, config, grad, dense_kernels[0])) - isa_ms
        row["speedup_bwd"] = {b_: ms / row["isa_bwd_ms"] for b_, ms in row["dense_bwd_ms"].items()}
        for x in (q, k, v):
            x.grad = None
            x.requires_grad_(False)
    return row


def check_against_torch_path(config, dtype) -> dict:
    """Relative L2 error of the Triton path against the PyTorch path (fp32 inputs copy) at a mid size."""
    B, H, L_src, L_ctx, D = 1, 4, 8192, 8192, 128
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(B, H, L_src + L_ctx, D, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    with torch.no_grad():
        out = ops.isa_attention_triton(q, k, v, L_src, config, scale=D ** -0.5)
        ref = isa_attention_torch(q.float(), k.float(), v.float(), L_src, config, scale=D ** -0.5)
        low = isa_attention_torch(q, k, v, L_src, config, scale=D ** -0.5)
    rel = lambda a: ((a.float() - ref).norm() / ref.norm()).item()  # noqa: E731
    return dict(shape=[B, H, L_src, L_ctx, D], triton_rel_err=rel(out), torch_same_precision_rel_err=rel(low))


def git_commit() -> str:
    if os.environ.get("LIVEDITOR_COMMIT"):
        return os.environ["LIVEDITOR_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def print_table(rows) -> None:
    dense_names = sorted({b_ for r in rows for b_ in r["dense_fwd_ms"]})
    header = ["shape", "N", "H"] + [f"{b_} ms" for b_ in dense_names] + ["ISA ms", "x fastest", "eff TF/s",
                                                                        "FLOP frac", "other %", "bwd x"]
    print(" | ".join(header))
    for r in rows:
        isa_ms = next(iter(r["isa_fwd_ms"].values()))
        fastest = r["fastest_dense"]
        cells = [r["shape"], str(r["N"]), str(r["H"])]
        cells += [f"{r['dense_fwd_ms'][b_]:.2f}" if r["dense_fwd_ms"].get(b_) else "-" for b_ in dense_names]
        cells += [f"{isa_ms:.2f}", f"{r['speedup_fwd'][fastest]:.2f}" if fastest else "-",
                  f"{r['isa_effective_tflops']:.0f}", f"{r['flop_fraction']:.3f}",
                  f"{100 * r['other_stages_fraction']:.1f}" if "other_stages_fraction" in r else "-"]
        if "speedup_bwd" in r and r["speedup_bwd"]:
            fastest_bwd = min(r["dense_bwd_ms"], key=r["dense_bwd_ms"].get)
            cells.append(f"{r['speedup_bwd'][fastest_bwd]:.2f} ({fastest_bwd})")
        else:
            cells.append("-")
        print(" | ".join(cells))
    for r in rows:
        if "stages_ms" in r:
            parts = ", ".join(f"{k_} {v_:.2f}" if isinstance(v_, float) else f"{k_} {v_}"
                              for k_, v_ in r["stages_ms"].items())
            print(f"stages {r['shape']}: {parts}")
        if len(r["isa_fwd_ms"]) > 1:
            print(f"exact-group kernels {r['shape']}: " + ", ".join(f"{k_} {v_:.2f} ms" for k_, v_ in r["isa_fwd_ms"].items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="headline shape and one sweep point only")
    parser.add_argument("--shapes", nargs="*", default=None, choices=list(SHAPES), help="named shapes")
    parser.add_argument("--sweep", nargs="*", type=int, default=None, help="total N values at H=40")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--json", dest="json_path", default="bench_isa.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_isa.py needs a CUDA GPU", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="# %(message)s")
    dtype = getattr(torch, args.dtype)
    config = ISAConfig()
    shapes = args.shapes if args.shapes is not None else ([HEADLINE] if args.quick else list(SHAPES))
    sweep = args.sweep if args.sweep is not None else ([32768] if args.quick else SWEEP)

    meta = dict(card=torch.cuda.get_device_name(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), commit=git_commit(), torch=torch.__version__, triton=__import__("triton").__version__,
        config=dataclasses.asdict(config), dtype=args.dtype)
    print(f"# {meta['card']}  {meta['date']}  commit {meta['commit']}  torch {meta['torch']}  triton {meta['triton']}")
    meta["check"] = check_against_torch_path(config, dtype)
    print(f"# check vs PyTorch path: {meta['check']}")

    rows = []
    for name in shapes:
        B, H, L_src, L_ctx, D = SHAPES[name]
        # Also time the other exact-group kernels: the Triton one where auto picks a dense kernel;
        # masked dense kernels (SDPA's choice, cuDNN) where the context's last block is partial and
        # auto picks Triton.
        dense_kernels = ("auto", "triton") if L_ctx % config.block_size == 0 else ("auto", "sdpa", "cudnn")
        try:
            rows.append(bench_shape(name, B, H, L_src, L_ctx, D, config, dtype,
                                    backward=not args.no_backward and name != "wan_720p_81f",
                                    breakdown=True, dense_kernels=dense_kernels))
        except torch.OutOfMemoryError:
            print(f"  {name}: out of memory, skipped", file=sys.stderr)
        torch.cuda.empty_cache()
        if rows and rows[-1]["shape"] == name:
            print_table(rows[-1:])
        write_json(args.json_path, dict(meta=meta, rows=rows))  # after every shape: a run cut short keeps them
    for n_tokens in sweep:
        half = n_tokens // 2
        try:
            rows.append(bench_shape(f"sweep_N{n_tokens}", 1, 40, half, n_tokens - half, 128, config, dtype,
                                    backward=False, breakdown=n_tokens >= 65536))
        except torch.OutOfMemoryError:
            print(f"  sweep N={n_tokens}: out of memory, skipped", file=sys.stderr)
        torch.cuda.empty_cache()
        write_json(args.json_path, dict(meta=meta, rows=rows))

    print()
    print_table(rows)
    meta["dense_kernel_choices"] = {" ".join(map(str, key)): name for key, name in dense_kernel_choices().items()}
    write_json(args.json_path, dict(meta=meta, rows=rows))
    print(f"# wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
