"""Seconds per denoising step on several GPUs: CFG parallel x Ulysses sequence parallel, dense and ISA.

One step = both CFG branches (text and negative prompt) at guidance 2.5. Default: the liveditor-14b
architecture with random bf16 weights (built once per rank, identical on every rank) at 544x960,
61 frames (32,640 tokens per segment, 65,280 in the sequence) and 512 text tokens, ISA with the
model's own config. Cells (all in one run, the ranks a cell does not use wait):

    1gpu-dense, 1gpu-isa                 the baselines (rank 0 alone)
    2gpu-cfg-dense, 2gpu-cfg-isa         the two CFG branches on two GPUs
    2gpu-ulysses-isa                     both branches, one after the other, Ulysses over 2 GPUs
    4gpu-cfg-ulysses-dense/-isa          CFG parallel x Ulysses 2
    4gpu-ulysses-dense/-isa              Ulysses over 4 GPUs

Reports seconds per step (the slowest rank), speedup over 1-GPU dense and 1-GPU ISA, and peak
memory per GPU (`torch.cuda.max_memory_allocated`, reset per cell). `--check` first compares, for
a small fp32 model, the guided flow of every layout the world allows with the one-process flow
(ISA and dense).

    torchrun --nproc_per_node 4 benchmarks/bench_parallel.py --check --json out.json
    torchrun --nproc_per_node 2 benchmarks/bench_parallel.py --preset liveditor-tiny --height 64 --width 64 \\
        --frames 9 --device cpu --check
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
from torch.nn.attention import sdpa_kernel

from liveditor.atomic import write_json
from liveditor.pipelines.parallel import ParallelLayout, guided_flow, init_distributed, launched_by_torchrun
from transformer_step import (
    SDPA_BACKENDS,
    add_shape_arguments,
    build_model,
    fastest,
    run_metadata,
    sdpa_times,
    segment_tokens,
    step_dtype,
    step_inputs,
    sync,
    video_latent,
)

GUIDANCE = 2.5
# name -> (GPUs, CFG degree, Ulysses degree, attention mode)
CELLS = {
    "1gpu-dense": (1, 1, 1, "dense"),
    "1gpu-isa": (1, 1, 1, "isa"),
    "2gpu-cfg-dense": (2, 2, 1, "dense"),
    "2gpu-cfg-isa": (2, 2, 1, "isa"),
    "2gpu-ulysses-isa": (2, 1, 2, "isa"),
    "4gpu-cfg-ulysses-dense": (4, 2, 2, "dense"),
    "4gpu-cfg-ulysses-isa": (4, 2, 2, "isa"),
    "4gpu-ulysses-dense": (4, 1, 4, "dense"),
    "4gpu-ulysses-isa": (4, 1, 4, "isa"),
}
CHECK_PRESET, CHECK_LATENT = "liveditor-small", (5, 32, 32)  # 1,280 tokens per segment, 20 ISA blocks
CHECK_TOLERANCE = 1e-4  # max |difference| relative to max |one-process flow|, fp32


def _log(*parts):
    if dist.get_rank() == 0:
        print(*parts, flush=True)


def build_shared_model(preset, dtype, device, seed):
    """The preset's random model on every rank, rank 0's parameters broadcast so that all ranks hold
    the same weights (buffers are not random)."""
    model = build_model(preset, dtype, device, seed)
    if dist.get_world_size() > 1:
        for parameter in model.parameters():
            dist.broadcast(parameter.data, src=0)
    return model


def guided_step(model, inputs, mode, layout):
    latents, context, text, negative, timestep = inputs

    def predict(embeds):
        return model(latents, timestep, embeds, context, attention_kwargs={"mode": mode}, return_dict=False)[0]

    return guided_flow(predict, text, negative, GUIDANCE, layout)


def fastest_sdpa(model, tokens, dtype, device, choice):
    """The SDPA backend for dense cells: `choice`, or on CUDA the faster of flash and cuDNN on one
    call of the full sequence (rank 0 decides for all)."""
    if device.type != "cuda":
        return "math"
    if choice != "auto":
        return choice
    box = [None]
    if dist.get_rank() == 0:
        cfg = model.config
        box[0] = fastest(sdpa_times(cfg.num_attention_heads, tokens, cfg.attention_head_dim, dtype, device))
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_cell(name, model, inputs, layout, warmup, steps, device, sdpa):
    """Time one cell on its ranks; every rank of the world returns the gathered per-rank rows."""
    _, cfg_degree, ulysses, mode = CELLS[name]
    row = None
    if layout.active:
        model.enable_sequence_parallel(layout.ulysses_group)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with sdpa_kernel([SDPA_BACKENDS[sdpa]]):
            for _ in range(warmup):
                guided_step(model, inputs, mode, layout)
            sync(device)
            if len(layout.ranks) > 1:
                dist.barrier(group=layout.group)
            start = time.perf_counter()
            for _ in range(steps):
                flow = guided_step(model, inputs, mode, layout)
            sync(device)
            seconds = (time.perf_counter() - start) / steps
        row = dict(seconds_per_step=seconds, finite=bool(torch.isfinite(flow).all()),
                   peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
        del flow
        model.enable_sequence_parallel(None)
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    rows = [r for r in rows if r is not None]
    return dict(cell=name, gpus=len(rows), cfg_degree=cfg_degree, ulysses_degree=ulysses, mode=mode,
                seconds_per_step=max(r["seconds_per_step"] for r in rows),
                seconds_per_step_per_rank=[r["seconds_per_step"] for r in rows],
                peak_memory_gib_per_gpu=[r["peak_memory_gib"] for r in rows],
                output_finite=all(r["finite"] for r in rows))


def correctness_check(layouts, device):
    """Every layout's guided flow against the one-process flow of a small fp32 model, ISA and dense."""
    if device.type == "cuda":  # exact fp32 matmuls: the comparison is about sharding, not TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    model = build_shared_model(CHECK_PRESET, torch.float32, device, seed=1)
    inputs = step_inputs(model.config, CHECK_LATENT, 16, torch.float32, device, seed=2)
    reference = {}
    if dist.get_rank() == 0:
        reference = {mode: guided_step(model, inputs, mode, None) for mode in ("isa", "dense")}
    results = []
    for (cfg_degree, ulysses), layout in layouts.items():
        for mode in ("isa", "dense"):
            error = None
            if layout.active:
                model.enable_sequence_parallel(layout.ulysses_group)
                flow = guided_step(model, inputs, mode, layout)
                model.enable_sequence_parallel(None)
                if dist.get_rank() == 0:
                    ref = reference[mode]
                    error = float((flow - ref).abs().max() / ref.abs().max())
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
            if dist.get_rank() == 0:
                ok = errors[0] is not None and errors[0] <= CHECK_TOLERANCE
                results.append(dict(gpus=cfg_degree * ulysses, cfg_degree=cfg_degree, ulysses_degree=ulysses,
                                    mode=mode, relative_max_error=errors[0], passed=ok))
                print(f"check {cfg_degree * ulysses} GPU(s), CFG {cfg_degree} x Ulysses {ulysses}, {mode}: "
                      f"relative max error {errors[0]:.2e} -> {'PASS' if ok else 'FAIL'}", flush=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default for matmuls
        torch.backends.cudnn.allow_tf32 = True
    del model, inputs, reference
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per cell (kernel compilation)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per cell")
    parser.add_argument("--cells", nargs="+", default=None, choices=[*CELLS, "none"],
                        help="default: every cell the world has GPUs for; none: only --check")
    parser.add_argument("--check", action="store_true", help="first compare every layout with one process (fp32)")
    parser.add_argument("--sdpa", choices=("auto", "flash", "cudnn"), default="auto", help="dense attention backend")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)

    device_type = torch.device(args.device).type
    if not launched_by_torchrun():  # plain `python bench_parallel.py`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rank, world = init_distributed("nccl" if device_type == "cuda" else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    dtype = step_dtype(args, device)
    names = [n for n in CELLS if CELLS[n][0] <= world] if args.cells is None else [n for n in args.cells if n != "none"]
    too_big = [n for n in names if CELLS[n][0] > world]
    if too_big:
        raise SystemExit(f"cells {too_big} need more than the {world} ranks of this run")

    # The check compares every layout of 2 GPUs and of the whole world (one GPU: the layout of one).
    check_degrees = {(c, u) for c in (1, 2) for u in (1, 2, 4) if c * u in {2, world} and c * u <= world}
    check_degrees = (check_degrees or {(1, 1)}) if args.check else set()
    # Group creation is collective: every rank creates every layout, in the same order.
    layouts = {(c, u): ParallelLayout.create(c, u, ranks=range(c * u))
               for c, u in sorted({CELLS[n][1:3] for n in names} | check_degrees)}
    _log(f"{world} rank(s) on {device.type}; cells: {', '.join(names) or 'none'}")

    checks = None
    if args.check:
        checks = correctness_check({k: layouts[k] for k in sorted(check_degrees)}, device)

    rows = []
    if names:
        begin = time.perf_counter()
        model = build_shared_model(args.preset, dtype, device, args.seed)
        latent = video_latent(args)
        tokens_per_segment = segment_tokens(model.config, latent)
        inputs = step_inputs(model.config, latent, args.text_tokens, dtype, device, args.seed)
        sdpa = fastest_sdpa(model, 2 * tokens_per_segment, dtype, device, args.sdpa)
        _log(f"model {args.preset} ({dtype}) on every rank in {time.perf_counter() - begin:.1f} s; "
             f"{2 * tokens_per_segment} tokens; dense SDPA backend: {sdpa}")
        for name in names:
            gpus, cfg_degree, ulysses, _ = CELLS[name]
            cell_start = time.perf_counter()
            row = run_cell(name, model, inputs, layouts[(cfg_degree, ulysses)], args.warmup, args.steps, device, sdpa)
            rows.append(row)
            _log(f"{name}: {row['seconds_per_step']:.3f} s/step, peak memory "
                 f"{', '.join('-' if m is None else f'{m:.1f}' for m in row['peak_memory_gib_per_gpu'])} GiB, "
                 f"finite {row['output_finite']} (cell took {time.perf_counter() - cell_start:.0f} s)")
        by_name = {r["cell"]: r["seconds_per_step"] for r in rows}
        for row in rows:
            for base in ("1gpu-dense", "1gpu-isa"):
                row[f"speedup_over_{base.replace('-', '_')}"] = (
                    by_name[base] / row["seconds_per_step"] if base in by_name else None)
    else:
        tokens_per_segment, latent = None, None

    if rank == 0:
        isa_config = dict(model.isa_config.__dict__) if names else None
        result = dict(
            benchmark="bench_parallel",
            **run_metadata(device),
            world_size=world,
            preset=args.preset,
            dtype=str(dtype).replace("torch.", ""),
            video=f"{args.height}x{args.width}x{args.frames}",
            latent=list(latent) if latent else None,
            tokens_per_segment=tokens_per_segment,
            text_tokens=args.text_tokens,
            guidance=GUIDANCE,
            warmup_steps=args.warmup,
            timed_steps=args.steps,
            isa_config=isa_config,
            dense_sdpa_backend=sdpa if names else None,
            cells=rows,
            check=checks,
        )
        if rows:
            print()
            print(f"{result['device']} x{world}  {args.preset} {result['dtype']}  {result['video']} -> "
                  f"{2 * tokens_per_segment} tokens, one step = both CFG branches")
            print("| cell | GPUs | CFG x Ulysses | mode | s/step | vs 1-GPU dense | vs 1-GPU ISA | peak GiB per GPU |")
            print("|---|---|---|---|---|---|---|---|")
            for r in rows:
                speedups = [r["speedup_over_1gpu_dense"], r["speedup_over_1gpu_isa"]]
                mem = ", ".join("-" if m is None else f"{m:.1f}" for m in r["peak_memory_gib_per_gpu"])
                print(f"| {r['cell']} | {r['gpus']} | {r['cfg_degree']} x {r['ulysses_degree']} | {r['mode']} | "
                      f"{r['seconds_per_step']:.3f} | "
                      + " | ".join("-" if s is None else f"{s:.2f}x" for s in speedups) + f" | {mem} |")
        if checks is not None:
            print(f"correctness check: {sum(c['passed'] for c in checks)}/{len(checks)} layouts pass")
        if args.json_path:
            write_json(args.json_path, result)
    failed = checks is not None and rank == 0 and not all(c["passed"] for c in checks)
    dist.barrier()
    dist.destroy_process_group()
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
