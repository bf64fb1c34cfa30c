"""Training throughput of the tiny LIVEditor: clips/s and model TFLOP/s of the training loop's own
optimizer step (`liveditor.training.loop.TrainStep`: codec, text encoder, flow-matching loss,
backward, clipping, fused AdamW, EMA), eager vs regional `torch.compile` vs compiled blocks replayed
as CUDA graphs (`train.cuda_graphs`; "graphs" rows), dense vs ISA attention, for several batch
sizes, in one run. Also the CPU data loader's clips/s with the loop's settings.

The step is timed on a pool of pre-rendered clips held on the device, as the loop's GPU renderer
delivers them (so the numbers are the model's, not the loader's or an upload's); the loader is timed
on its own. "host ms" is the time the host takes to issue one step while the GPU is idle: near the
step time, the host is the limit. FLOPs count dense attention in full (ISA rows are
dense-equivalent rates).

    python benchmarks/bench_train.py --json bench_train.json
    python benchmarks/bench_train.py --batch-sizes 2 --compile off --steps 2 --warmup 1 --device cpu   # smoke test

`--profile-steps K` also runs K steps under `torch.profiler` per row and reports where a step's
device time goes (matmul, attention, Inductor-fused elementwise, optimizer, communication, other),
kernels launched per step and the top kernels: what to attack when the step is the limit. With
`--kernel-bandwidth` (CUDA) it also gives each Inductor kernel's bytes and achieved TB/s: a kernel far
under the card's bandwidth has a launch or layout problem; at it, only fewer bytes make it faster.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import warnings
from pathlib import Path

import torch

from liveditor.atomic import write_json
from liveditor.data.shapes_batch import example_seeds
from liveditor.data.shards import ShapeEditDataset
from liveditor.training import build_components, load_config
from liveditor.training.loop import (
    ENDLESS,
    TrainStep,
    _batches,
    _shapeedit_config,
    estimate_latent_statistics,
    sample_seeds,
    training_flops_per_clip,
)
from transformer_step import run_metadata

REPO = Path(__file__).resolve().parents[1]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _alloc_retries(device) -> int:
    """How often the CUDA caching allocator has had to free its cache and retry an allocation (0 on a CPU)."""
    return torch.cuda.memory_stats(device).get("num_alloc_retries", 0) if device.type == "cuda" else 0


def render_pool(config, clips: int, workers: int) -> list[dict]:
    """`clips` training clips, rendered by a pool of processes."""
    from torch.utils.data import DataLoader

    seeds = example_seeds(config.train.seed, 0, 0, clips)
    loader = DataLoader(ShapeEditDataset(ENDLESS, "train", config=_shapeedit_config(config)), sampler=seeds,
                        batch_size=None, num_workers=workers)
    return list(loader)


def batch_of(pool: list[dict], start: int, size: int, device) -> dict:
    """A batch of pool clips already on `device` (as the loop's GPU renderer delivers them), so that
    the step's time has no host-to-device copy in it."""
    items = [pool[(start + i) % len(pool)] for i in range(size)]
    return {"source": torch.stack([x["source"] for x in items]).to(device),
            "target": torch.stack([x["target"] for x in items]).to(device),
            "instruction": [x["instruction"] for x in items]}


KERNEL_CATEGORIES = (  # first match wins; names of CUDA kernels (or CPU aten ops on a CPU run)
    # ISA's and the few-key cross-attention's Triton kernels (liveditor.isa.triton_sparse, triton_few_keys)
    # and the dense SDPA backends
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa", "_fwd_kernel", "_bwd_", "_move_", "_kept_kernel",
                   "_users_")),
    ("matmul", ("gemm", "matmul", "aten::mm", "aten::bmm", "aten::addmm", "cutlass", "xmma", "nvjet", "sm90",
                "triton_tem")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("communication", ("nccl", "allreduce", "all_reduce")),
    ("fused elementwise (Inductor)", ("triton_",)),
)


def kernel_category(name: str) -> str:
    lowered = name.lower()
    return next((category for category, keys in KERNEL_CATEGORIES if any(k in lowered for k in keys)), "other")


def inductor_kernel_bytes() -> dict[str, float]:
    """{kernel name: bytes one call moves} for every Inductor Triton kernel this process loaded, by
    Inductor's own count (`kernel_num_gb`: each buffer read or written once), which it records only
    for kernels compiled while `torch._inductor.config.benchmark_kernel` is on."""
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    found = {}
    with warnings.catch_warnings():  # isinstance on some library's lazy proxy objects warns
        warnings.simplefilter("ignore")
        autotuners = [obj for obj in gc.get_objects() if isinstance(obj, CachingAutotuner)]
    for autotuner in autotuners:
        meta = autotuner.inductor_meta or {}
        if meta.get("kernel_num_gb") is not None and "kernel_name" in meta:
            found[meta["kernel_name"]] = meta["kernel_num_gb"] * 1e9
    return found


def kernel_bandwidth(events: list[tuple[str, float, int]], kernel_bytes: dict[str, float], steps: int) -> dict:
    """Achieved bandwidth of the profiled kernels whose bytes are known. `events`: (name, device
    microseconds, calls) over `steps` steps. Kernels by time a step, largest first, and their totals."""
    kernels = []
    for name, micros, count in events:
        if name in kernel_bytes and micros > 0:
            kernels.append({"name": name[:120], "ms_per_step": micros / 1e3 / steps, "calls_per_step": count / steps,
                            "gb_per_call": kernel_bytes[name] / 1e9,
                            "tb_per_s": kernel_bytes[name] * count / (micros * 1e-6) / 1e12})
    kernels.sort(key=lambda k: -k["ms_per_step"])
    ms = sum(k["ms_per_step"] for k in kernels)
    gb = sum(k["gb_per_call"] * k["calls_per_step"] for k in kernels)
    return {"kernels": kernels, "ms_per_step": ms, "gb_per_step": gb, "tb_per_s": gb / ms if ms else float("nan")}


def profile_step(step_fn, batches, steps: int, device, bandwidth: bool = False) -> dict:
    """Device time per optimizer step by kernel category, kernels per step and the top kernels
    (on a CPU run: CPU time of the aten ops); `bandwidth`: also the achieved bandwidth of Inductor's
    kernels (see kernel_bandwidth; needs benchmark_kernel on when they were compiled)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            loss = step_fn([batches[i % len(batches)]], 1e-4)
        loss.item()
        _sync(device)
    if cuda:
        events = [(e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
                  if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    else:
        events = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()
                  if e.key.startswith("aten::") and e.self_cpu_time_total > 0]
    by_category: dict[str, float] = {}
    for name, micros, _ in events:
        category = kernel_category(name)
        by_category[category] = by_category.get(category, 0.0) + micros / 1e3 / steps
    top = sorted(events, key=lambda e: -e[1])[:80]
    result = {
        "device_ms_per_step": sum(by_category.values()),
        "ms_per_step": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "kernels_per_step": sum(count for _, _, count in events) / steps,
        "top": [{"name": name[:120], "ms_per_step": micros / 1e3 / steps, "calls_per_step": count / steps}
                for name, micros, count in top],
    }
    if bandwidth:
        result["inductor_bandwidth"] = kernel_bandwidth(events, inductor_kernel_bytes(), steps)
    return result


def time_step(config, accelerator, stats, pool, steps: int, warmup: int, profile_steps: int = 0,
              bandwidth: bool = False) -> dict:
    """Seconds per optimizer step of a fresh model with this config (after `warmup` steps)."""
    device = accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    tokenizer, text_encoder, codec, transformer = build_components(config, *stats)
    step_fn = TrainStep(config, accelerator, tokenizer, text_encoder, codec, transformer)
    size = config.train.batch_size
    batches = [(batch_of(pool, i * size, size, device), sample_seeds(0, 0, range(i * size, (i + 1) * size)))
               for i in range(4)]
    start = time.perf_counter()
    for i in range(warmup):
        loss = step_fn([batches[i % 4]], 1e-4)
    loss.item()
    first = time.perf_counter() - start  # includes compilation
    # Compilation leaves ~770K Python objects, whose full collection took 0.4-0.5 s (one H200,
    # 2026-11-29): one falling in the timed steps adds 20-25 ms to a 20-step average.
    gc.collect()
    _sync(device)
    retries_before = _alloc_retries(device)
    start = time.perf_counter()
    for i in range(steps):
        loss = step_fn([batches[i % 4]], 1e-4)
    loss.item()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    # A retry frees the allocator's cached blocks (cudaFree waits for the device) and asks again: non-zero
    # here means the timed steps ran against the memory limit.
    alloc_retries = _alloc_retries(device) - retries_before
    # Host time to issue one step with an idle GPU: close to step_s means the host, not the GPU, is the limit.
    host = 0.0
    for i in range(3):
        _sync(device)
        start = time.perf_counter()
        step_fn([batches[i % 4]], 1e-4)
        host += time.perf_counter() - start
    _sync(device)
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    reserved = torch.cuda.max_memory_reserved(device) / 2**30 if cuda else float("nan")
    result = {"step_s": seconds, "host_s": host / 3, "warmup_s": first, "loss": float(loss), "peak_gib": peak,
              "peak_reserved_gib": reserved, "alloc_retries": alloc_retries}
    if profile_steps > 0:
        result["profile"] = profile_step(step_fn, batches, profile_steps, device, bandwidth)
    del step_fn, transformer, text_encoder
    torch.compiler.reset()  # frees the CUDA-graph memory pools, which would crowd out the next row
    accelerator.free_memory()
    return result


def time_loader(config, seconds: float) -> dict:
    """Clips/s of the loop's data loader (config.data.num_workers processes, config.data.renderer)
    over `seconds`."""
    batches = _batches(config, 0, 0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    next(batches)  # workers started
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(next(batches)["instruction"])
    return {"workers": config.data.num_workers, "renderer": config.data.renderer,
            "clips_per_s": count / (time.perf_counter() - start)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny-shapeedit.toml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--attention", nargs="+", choices=("dense", "isa"), default=["dense", "isa"])
    parser.add_argument("--compile", nargs="+", choices=("off", "on", "graphs"), default=["off", "on", "graphs"],
                        help="eager, regional torch.compile, or compiled blocks as CUDA graphs")
    parser.add_argument("--steps", type=int, default=15, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--loader-seconds", type=float, default=10.0, help="0 skips the data loader timing")
    parser.add_argument("--pool", type=int, default=512, help="pre-rendered clips the steps cycle through")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="also profile this many steps per row: device time by kernel category")
    parser.add_argument("--kernel-bandwidth", action="store_true",
                        help="with --profile-steps on CUDA: bytes (Inductor's count) and achieved TB/s of each "
                             "Inductor kernel (compiles them with torch._inductor.config.benchmark_kernel on)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)

    from accelerate import Accelerator

    base = load_config(args.config, args.overrides + ["codec.stats_clips=8"])
    cpu = args.device == "cpu" or not torch.cuda.is_available()
    if args.kernel_bandwidth:
        if cpu or args.profile_steps < 1:
            parser.error("--kernel-bandwidth needs a CUDA device and --profile-steps (it reads Inductor's Triton kernels)")
        from torch._inductor import config as inductor_config

        inductor_config.benchmark_kernel = True
    accelerator = Accelerator(mixed_precision="no" if cpu else "bf16", cpu=cpu)
    device = accelerator.device
    stats = estimate_latent_statistics(base)
    pool = render_pool(base, args.pool, base.data.num_workers)
    flops = training_flops_per_clip(base)
    rows = []
    for attention in args.attention:
        for compiled in args.compile:
            for batch in args.batch_sizes:
                config = load_config(args.config, args.overrides + [
                    f'model.attention="{attention}"', f"train.compile={'false' if compiled == 'off' else 'true'}",
                    f"train.cuda_graphs={'true' if compiled == 'graphs' else 'false'}", f"train.batch_size={batch}"])
                row = {"attention": attention, "compile": compiled, "batch": batch}
                try:
                    row.update(time_step(config, accelerator, stats, pool, args.steps, args.warmup, args.profile_steps,
                                          args.kernel_bandwidth))
                    row["clips_per_s"] = batch / row["step_s"]
                    row["tflop_per_s"] = row["clips_per_s"] * flops / 1e12
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                    accelerator.free_memory()
                except Exception as exc:  # a failed variant is a row of the table, not the end of the run
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    accelerator.free_memory()
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json_path:  # rows so far survive a run cut short
                    write_json(args.json_path, {"rows": rows})
    loader = None
    if args.loader_seconds > 0:
        loader = [time_loader(load_config(args.config, args.overrides + [f'data.renderer="{renderer}"']), args.loader_seconds)
                  for renderer in ("reference", "batch")]

    result = {
        **run_metadata(device),
        "config": args.config,
        "overrides": args.overrides,
        "tokens_per_clip": 2 * (base.data.frames // base.codec.scale_factor_temporal)
        * (base.data.height // base.codec.scale_factor_spatial // 2) * (base.data.width // base.codec.scale_factor_spatial // 2),
        "training_gflop_per_clip": flops / 1e9,
        "isa_config": dict(base.model.isa),
        "rows": rows,
        "loader": loader,
    }
    print(f"\n{result['device']}, torch {result['torch']}, commit {result['commit']}, {result['tokens_per_clip']} tokens/clip, "
          f"{flops / 1e9:.0f} GFLOP per training clip")
    print("| attention | compile | batch | clips/s | TFLOP/s | step ms | host ms | first steps s | peak GiB "
          "| reserved GiB | alloc retries |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['attention']} | {r['compile']} | {r['batch']} | {r['error']} | | | | | | | |")
        else:
            print(f"| {r['attention']} | {r['compile']} | {r['batch']} | {r['clips_per_s']:.0f} | {r['tflop_per_s']:.1f} "
                  f"| {1e3 * r['step_s']:.1f} | {1e3 * r['host_s']:.1f} | {r['warmup_s']:.1f} | {r['peak_gib']:.1f} "
                  f"| {r['peak_reserved_gib']:.1f} | {r['alloc_retries']} |")
    for r in rows:
        if "profile" in r:
            prof = r["profile"]
            parts = ", ".join(f"{category} {ms:.1f}" for category, ms in prof["ms_per_step"].items())
            print(f"{r['attention']} / compile {r['compile']} / batch {r['batch']}: {prof['device_ms_per_step']:.1f} ms of "
                  f"kernels per {1e3 * r['step_s']:.1f} ms step; by kind: {parts}; "
                  f"{prof['kernels_per_step']:.0f} kernels per step; top: "
                  + "; ".join(f"{t['name'][:60]} {t['ms_per_step']:.1f} ms" for t in prof["top"][:5]))
    for r in rows:
        bandwidth = r.get("profile", {}).get("inductor_bandwidth")
        if bandwidth:
            print(f"\n{r['attention']} / compile {r['compile']} / batch {r['batch']}: Inductor's kernels "
                  f"{bandwidth['ms_per_step']:.1f} ms per step move {bandwidth['gb_per_step']:.0f} GB "
                  f"({bandwidth['tb_per_s']:.2f} TB/s overall)")
            print("| Inductor kernel | ms per step | calls | GB per call | TB/s |")
            print("|---|---|---|---|---|")
            for k in bandwidth["kernels"][:20]:
                print(f"| {k['name'][:90]} | {k['ms_per_step']:.2f} | {k['calls_per_step']:.0f} | {k['gb_per_call']:.3f} "
                      f"| {k['tb_per_s']:.2f} |")
    for row in loader or []:
        print(f"data loader ({row['renderer']} renderer): {row['clips_per_s']:.0f} clips/s with {row['workers']} worker processes")
    if args.json_path:
        write_json(args.json_path, result)
        print(f"wrote {args.json_path}")
    return result


if __name__ == "__main__":
    main()
