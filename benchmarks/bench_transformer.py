"""Seconds per denoising step of the LIVEditor transformer: dense attention vs ISA.

One denoising step = two transformer forwards (the CFG text and negative branches, both with the
context video). Default: the liveditor-14b architecture with random bf16 weights at 544x960,
61 frames (32,640 tokens per segment, 65,280 in the in-context sequence) and Wan's 512 text tokens.
The dense baseline uses the fastest PyTorch SDPA backend found at that shape. Also times the
attention operator alone and the share of the step spent in self-attention.

    python benchmarks/bench_transformer.py --json out.json
    python benchmarks/bench_transformer.py --preset liveditor-tiny --height 64 --width 64 --frames 9 --device cpu

With `--cells` it instead measures single-GPU cells in one run (default `all`): dense, ISA,
ISA + regional torch.compile, ISA + compile + FP8 linears, ISA + group offload (weights in pinned
CPU memory, one block on the GPU at a time, copies on a side stream). Per cell: seconds per step
after `--warmup` untimed steps, speedup over dense and over ISA, peak GPU memory during the
cell's steps, compile time apart; the FP8 error against bf16 per converted linear and for the
whole step. Cells that need CUDA are skipped on the CPU with a one-line note.

    python benchmarks/bench_transformer.py --cells all --json cells.json
    python benchmarks/bench_transformer.py --cells all --preset liveditor-tiny --height 64 --width 64 --frames 9 --device cpu
"""

from __future__ import annotations

import argparse
import gc
import time
import traceback

import torch
from torch.nn.attention import sdpa_kernel

from liveditor.atomic import write_json
from liveditor.errors import LIVEditorError, require
from liveditor.isa import ISAConfig, isa_attention
from liveditor.models import LIVEditorTransformer3DModel
from liveditor.pipelines.acceleration import (
    FP8ErrorReport,
    LinearSampler,
    check_fp8_device,
    compile_transformer,
    enable_fp8,
    fp8_linear_names,
    group_offload_kwargs,
    linear_errors,
    relative_l2,
)
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
    timed,
    video_latent,
)

CELLS = ("dense", "isa", "isa+compile", "isa+compile+fp8", "isa+group-offload")
# A cell measured on a model that an earlier cell prepared: FP8 converts the compiled model and
# compares its linears on the inputs sampled during the ISA cell.
CELL_NEEDS = {"isa+compile+fp8": ("isa", "isa+compile")}

def make_inputs(cfg, args, device, dtype):
    """Latent shape, tokens per segment and the step's inputs at the benchmark's video size."""
    latent = video_latent(args)
    return (1, cfg.in_channels, *latent), segment_tokens(cfg, latent), step_inputs(
        cfg, latent, args.text_tokens, dtype, device, args.seed)


def attention_op_times(cfg, tokens: int, dtype, device) -> tuple[str, dict, float]:
    """The fastest SDPA backend on one self-attention call of the step's shape, every backend's
    seconds, and ISA's seconds on the same call (paper defaults)."""
    times = sdpa_times(cfg.num_attention_heads, tokens, cfg.attention_head_dim, dtype, device)
    q, k, v = (torch.randn(1, cfg.num_attention_heads, tokens, cfg.attention_head_dim, dtype=dtype, device=device)
               for _ in range(3))
    isa_cfg = ISAConfig()
    isa_attention(q, k, v, tokens // 2, isa_cfg)  # warm-up / kernel compilation
    isa_time = timed(lambda: isa_attention(q, k, v, tokens // 2, isa_cfg), device, 2)
    return fastest(times), times, isa_time


def parse_cells(parser, text):
    cells = list(CELLS) if text == "all" else [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELLS]
    if unknown or not cells:
        parser.error(f"--cells: unknown cell(s) {unknown}; choose 'all' or among {', '.join(CELLS)}")
    for cell in cells:
        missing = [c for c in CELL_NEEDS.get(cell, ()) if c not in cells]
        if missing:
            parser.error(f"--cells: {cell} needs the cell(s) {', '.join(missing)} in the same run")
    return [c for c in CELLS if c in cells]  # the order in which they can run


def cells_unavailable(cells, device) -> dict:
    """The requested cells this device cannot run, each with the reason."""
    skipped = {}
    if "isa+group-offload" in cells and device.type != "cuda":
        skipped["isa+group-offload"] = "needs CUDA (streams weights from CPU memory to the GPU)"
    if "isa+compile+fp8" in cells:
        try:
            require("torchao")
            check_fp8_device(device)
        except LIVEditorError as exc:
            skipped["isa+compile+fp8"] = str(exc)
    return skipped


def _peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def measure_cell(step, device, warmup, steps, before_first=None):
    """Run `warmup` untimed then `steps` timed denoising steps; peak memory over all of them.
    `before_first(run)` may wrap the first step (e.g. to sample layer inputs)."""
    _reset_peak(device)
    warmup_seconds = []
    for i in range(warmup):
        first = i == 0 and before_first is not None
        warmup_seconds.append(timed(lambda: before_first(step) if first else step(), device))
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        prediction = step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    return dict(seconds_per_step=seconds, warmup_seconds=warmup_seconds, peak_memory_gib=_peak_gib(device),
                output_finite=bool(torch.isfinite(prediction).all())), prediction


def copy_to_cpu(model):
    """A CPU copy of `model` (parameters and all buffers, dtypes kept), built without initialising
    weights: the group-offload cell's weights, taken before FP8 replaces the bf16 ones. From a GPU
    the copy lands in pinned memory, which group offloading then uses as it is."""
    with torch.device("meta"):
        copy = LIVEditorTransformer3DModel.from_config(model.config)
    modules = dict(copy.named_modules())
    with torch.no_grad():
        for name, source in [*model.named_parameters(), *model.named_buffers()]:
            owner, _, attr = name.rpartition(".")
            module = modules[owner]
            value = torch.empty(source.shape, dtype=source.dtype, device="cpu", pin_memory=source.is_cuda)
            value.copy_(source)
            if attr in module._parameters:
                module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[attr] = value
    left = [name for name, t in [*copy.named_parameters(), *copy.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"copy_to_cpu left tensors on the meta device: {left[:3]}")
    return copy.eval()


def run_cells(args, cells, device, dtype):
    """The single-GPU cells (see the module docstring), each measured on this machine in one run."""
    begin_total = time.perf_counter()
    steps = args.steps or 2
    if args.warmup < 1 and any("compile" in c for c in cells):
        raise SystemExit("--warmup must be at least 1 with a compile cell (the first step compiles)")
    skipped = cells_unavailable(cells, device)
    for cell, reason in skipped.items():
        print(f"{cell}: skipped: {reason}", flush=True)
    cells = [c for c in cells if c not in skipped]

    begin = time.perf_counter()
    model = build_model(args.preset, dtype, device, args.seed)
    build_seconds = time.perf_counter() - begin
    cfg = model.config
    isa_config = dict(model.isa_config.__dict__)
    latent_shape, tokens_per_segment, (latents, context, text, negative, timestep) = make_inputs(cfg, args, device, dtype)
    print(f"{args.preset} {dtype} built on {device} in {build_seconds:.1f} s; {2 * tokens_per_segment} tokens", flush=True)

    def make_step(transformer):
        def step():
            with torch.no_grad():
                out = transformer(latents, timestep, text, context, return_dict=False)[0]
                out_neg = transformer(latents, timestep, negative, context, return_dict=False)[0]
                return out_neg + 2.5 * (out - out_neg)

        return step

    step = make_step(model)
    rows, outputs, extra = {}, {}, {}
    sampler = None
    fp8_report = None

    def record(cell, row, prediction):
        rows[cell] = dict(cell=cell, **row)
        outputs[cell] = prediction.float().cpu()
        print(f"{cell}: {row['seconds_per_step']:.3f} s/step"
              + (f", peak {row['peak_memory_gib']:.1f} GiB" if row["peak_memory_gib"] is not None else "")
              + (f", compile {row['compile_seconds']:.1f} s" if row.get("compile_seconds") is not None else "")
              + f", finite output: {row['output_finite']}", flush=True)
        snapshot(complete=False)

    failed = {}

    def attempt(cell, run):
        """Run one cell; a failure is recorded in one line and the run goes on with the next cell."""
        missing = [c for c in CELL_NEEDS.get(cell, ()) if c not in rows]
        if missing:
            failed[cell] = f"not run: {', '.join(missing)} did not complete"
        else:
            try:
                run()
                return
            except Exception as exc:  # noqa: BLE001 (one cell's failure must not cost the others)
                traceback.print_exc()
                failed[cell] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        print(f"{cell}: FAILED: {failed[cell]}", flush=True)

    def dense_cell():
        best_sdpa = "math"
        if device.type == "cuda":
            best_sdpa = fastest(sdpa_times(cfg.num_attention_heads, 2 * tokens_per_segment,
                                           cfg.attention_head_dim, dtype, device))
            extra["dense_sdpa_backend"] = best_sdpa
        model.set_attention_mode("dense")
        try:
            with sdpa_kernel([SDPA_BACKENDS[best_sdpa]]):
                row, prediction = measure_cell(step, device, args.warmup, steps)
        finally:
            model.set_attention_mode("isa")
        record("dense", row, prediction)

    def isa_cell():
        def sample_fp8_inputs(run):
            with LinearSampler(model, fp8_linear_names(model), rows=args.fp8_rows, seed=args.seed) as s:
                run()
            nonlocal sampler
            sampler = s

        wrap = sample_fp8_inputs if "isa+compile+fp8" in cells else None
        row, prediction = measure_cell(step, device, max(args.warmup, 1 if wrap else 0), steps, before_first=wrap)
        record("isa", row, prediction)

    def compiled_cell(cell):
        nonlocal sampler, fp8_report
        if cell == "isa+compile":
            compile_transformer(model)
        else:
            begin = time.perf_counter()
            enable_fp8(model)
            extra["fp8_convert_seconds"] = time.perf_counter() - begin
            fp8_report = FP8ErrorReport(layers=linear_errors(model, sampler.samples))
            sampler = None
        row, prediction = measure_cell(step, device, args.warmup, steps)
        # The first step compiles (FP8: recompiles for the new weight type); the rest run compiled.
        row["compile_seconds"] = row["warmup_seconds"][0] - row["seconds_per_step"]
        reference = "isa+compile" if cell == "isa+compile+fp8" else "isa"
        if reference in outputs:
            row[f"error_vs_{reference}"] = relative_l2(prediction.float().cpu(), outputs[reference])
        if fp8_report is not None:
            fp8_report.output = row.get("error_vs_isa+compile")
        record(cell, row, prediction)

    def copy_weights():
        nonlocal cpu_copy
        begin = time.perf_counter()
        cpu_copy = copy_to_cpu(model)
        extra["copy_to_cpu_seconds"] = time.perf_counter() - begin
        print(f"weights copied to the CPU for the group-offload cell in {extra['copy_to_cpu_seconds']:.1f} s", flush=True)

    def group_offload_cell():
        extra["resident_gib_before_offload"] = torch.cuda.memory_allocated(device) / 2**30
        begin = time.perf_counter()
        cpu_copy.enable_group_offload(**group_offload_kwargs(device))
        extra["group_offload_setup_seconds"] = time.perf_counter() - begin  # pins the weights
        print(f"group offload set up in {extra['group_offload_setup_seconds']:.1f} s "
              f"({extra['resident_gib_before_offload']:.2f} GiB resident before)", flush=True)
        row, prediction = measure_cell(make_step(cpu_copy), device, args.warmup, steps)
        if "isa" in outputs:
            row["error_vs_isa"] = relative_l2(prediction.float().cpu(), outputs["isa"])
        record("isa+group-offload", row, prediction)

    def snapshot(complete: bool) -> dict:
        """The run's result so far; written to --json after every cell, so a run stopped by a time
        limit keeps the cells it finished."""
        for row in rows.values():
            for base in ("dense", "isa"):
                row[f"speedup_vs_{base}"] = (rows[base]["seconds_per_step"] / row["seconds_per_step"]) if base in rows else None
            row["projected_32_step_edit_s"] = 32 * row["seconds_per_step"]
        result = dict(
            benchmark="bench_transformer_cells",
            **run_metadata(device),
            complete=complete,
            preset=args.preset,
            dtype=str(dtype).replace("torch.", ""),
            video=f"{args.height}x{args.width}x{args.frames}",
            latent=list(latent_shape),
            sequence_tokens=2 * tokens_per_segment,
            text_tokens=args.text_tokens,
            warmup_steps=args.warmup,
            timed_steps=steps,
            isa_config=isa_config,
            model_build_seconds=build_seconds,
            skipped=skipped,
            failed=failed,
            **extra,
            rows=list(rows.values()),
            fp8_error=fp8_report.to_dict() if fp8_report is not None else None,
            total_seconds=time.perf_counter() - begin_total,
        )
        if args.json_path:
            write_json(args.json_path, result)
        return result

    cpu_copy = None
    if "dense" in cells:
        attempt("dense", dense_cell)
    if "isa" in cells:
        attempt("isa", isa_cell)
    if "isa+group-offload" in cells:  # before FP8 replaces the bf16 weights
        attempt("isa+group-offload", copy_weights)
    for cell in ("isa+compile", "isa+compile+fp8"):
        if cell in cells:
            attempt(cell, lambda: compiled_cell(cell))
    if fp8_report is not None:
        print(fp8_report.summary(), flush=True)
    if "isa+group-offload" in cells and cpu_copy is not None:
        # Only the offloaded copy may hold GPU memory during this cell.
        del model, step
        gc.collect()
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        attempt("isa+group-offload", group_offload_cell)

    result = snapshot(complete=True)

    print()
    print(f"{result['device']}  {args.preset} {result['dtype']}  {result['video']} -> {2 * tokens_per_segment} tokens, "
          f"{args.warmup} warm-up + {steps} timed steps per cell, {result['date']}")
    print(f"{'cell':<18} {'s/step':>8} {'vs dense':>9} {'vs ISA':>7} {'peak GiB':>9} {'compile s':>10} {'32-step edit':>13}")

    def fmt(value, spec, suffix=""):
        return "-" if value is None else f"{value:{spec}}{suffix}"

    for r in rows.values():
        print(f"{r['cell']:<18} {r['seconds_per_step']:>8.3f} {fmt(r['speedup_vs_dense'], '8.2f', 'x'):>9} "
              f"{fmt(r['speedup_vs_isa'], '6.2f', 'x'):>7} {fmt(r['peak_memory_gib'], '9.1f'):>9} "
              f"{fmt(r.get('compile_seconds'), '10.1f'):>10} {r['projected_32_step_edit_s'] / 60:>9.2f} min")
    for r in rows.values():
        for key in ("error_vs_isa", "error_vs_isa+compile"):
            if key in r:
                print(f"{r['cell']}: output {key.replace('_', ' ')} (relative L2) {r[key]:.4f}")
    if fp8_report is not None:
        print(fp8_report.summary())
    for cell, reason in skipped.items():
        print(f"{cell}: skipped ({reason})")
    for cell, reason in failed.items():
        print(f"{cell}: FAILED ({reason})")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--steps", type=int, default=None, help="timed denoising steps per mode (default 1; 2 with --cells)")
    parser.add_argument("--cells", nargs="?", const="all", default=None,
                        help="measure single-GPU cells instead: 'all' or a comma list of " + ", ".join(CELLS))
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each cell's timed steps (--cells)")
    parser.add_argument("--fp8-rows", type=int, default=256,
                        help="tokens per linear on which the FP8 layer error is measured (--cells)")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = step_dtype(args, device)
    if args.cells is not None:
        return run_cells(args, parse_cells(parser, args.cells), device, dtype)
    args.steps = args.steps or 1
    model = build_model(args.preset, dtype, device, args.seed)
    cfg = model.config
    latent_shape, tokens_per_segment, (latents, context, text, negative, timestep) = make_inputs(cfg, args, device, dtype)

    best_sdpa, op_times, isa_op_time = attention_op_times(cfg, 2 * tokens_per_segment, dtype, device)
    print(f"attention op alone ({2 * tokens_per_segment} tokens): "
          + ", ".join(f"{k} {v:.4f}s" for k, v in op_times.items() if v is not None)
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
                warm_s = timed(lambda: model(latents, timestep, text, context, return_dict=False), device)
                print(f"isa warm-up forward (kernel compilation included): {warm_s:.2f} s", flush=True)
            timer.reset()
            timer.enabled = True
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                prediction = step()
            sync(device)
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
    result = dict(
        benchmark="bench_transformer",
        **run_metadata(device),
        preset=args.preset,
        dtype=str(dtype).replace("torch.", ""),
        video=f"{args.height}x{args.width}x{args.frames}",
        latent=list(latent_shape),
        tokens_per_segment=tokens_per_segment,
        sequence_tokens=2 * tokens_per_segment,
        text_tokens=args.text_tokens,
        isa_config=dict(ISAConfig().__dict__),
        dense_sdpa_backend=best_sdpa,
        attention_op_seconds={**{f"sdpa_{k}": v for k, v in op_times.items()}, "isa": isa_op_time},
        attention_op_speedup=op_times[best_sdpa] / isa_op_time,
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
    return result


if __name__ == "__main__":
    main()
