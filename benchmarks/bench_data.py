"""ShapeEdit data throughput: the reference renderer vs the batched PyTorch renderer.

Rows (clips/s, each clip = a source and a target video):
- ``reference``: `generate_example` on one core (numpy), the per-core rate of a CPU loader worker;
- ``draw``: `SceneBatch.draw` on one core, scene sampling only (what a loader worker does when
  the GPU renders);
- ``handoff``: unpickling one `SceneBatch` per batch size, on one core: what the training process
  pays per batch a DataLoader worker sends it (``bytes``: the pickle's size, ``ms``: per batch);
- ``render_scenes``: `ShapeEditBatchRenderer.render_scenes` on pre-drawn batches, per device and
  batch size (the renderer alone);
- ``render``: `ShapeEditBatchRenderer.render`, drawing in the calling process then rendering;
- ``stream``: `SceneBatchStream` through a DataLoader with ``--workers`` processes drawing, the
  main process rendering on the device: what a training loop gets.

    python benchmarks/bench_data.py --json bench_data.json                   # CPU, and CUDA if present
    python benchmarks/bench_data.py --devices cuda --batch-sizes 64 256 1024 --workers 8

Prints a table and writes JSON (``meta`` + ``rows``).
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import subprocess
import time
from pathlib import Path

import torch

from liveditor.atomic import write_json


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up, device work included."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", nargs="+", default=None, help="torch devices (default: cpu, and cuda if present)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--reference-clips", type=int, default=200, help="clips for the one-core rows")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (median)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers for the stream rows (default: up to 8 where CUDA is present, else none)")
    parser.add_argument("--stream-batches", type=int, default=40, help="batches timed per stream row")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for the CPU renderer rows")
    parser.add_argument("--json", dest="json_path", default="bench_data.json")
    args = parser.parse_args()

    from torch.utils.data import DataLoader

    from liveditor.data.shapes import ShapeEditConfig, generate_example
    from liveditor.data.shapes_batch import SceneBatch, SceneBatchStream, ShapeEditBatchRenderer, example_seeds

    if args.threads:
        torch.set_num_threads(args.threads)
    config = ShapeEditConfig(frames=args.frames, height=args.height, width=args.width)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    workers = args.workers
    if workers is None:
        workers = min(8, (os.cpu_count() or 2) - 1) if torch.cuda.is_available() else 0
    rows = []

    def add(kind: str, device: str, batch: int | None, clips: int, seconds: float, **extra) -> None:
        row = dict(kind=kind, device=device, batch=batch, clips=clips, seconds=round(seconds, 5),
                   clips_per_s=round(clips / seconds, 1), **extra)
        rows.append(row)
        print(f"{kind:14s} {device:5s} batch {str(batch or '-'):>5s}  {row['clips_per_s']:>10.1f} clips/s"
              + "".join(f"  {k}={v}" for k, v in extra.items()), flush=True)

    n = args.reference_clips
    cpu = torch.device("cpu")
    seconds = _timed(lambda: [generate_example(s, "train", config=config) for s in range(n)], cpu, 1)
    add("reference", "cpu", None, n, seconds, cores=1)
    seconds = _timed(lambda: SceneBatch.draw(range(n), "train", config=config), cpu, 1)
    add("draw", "cpu", None, n, seconds, cores=1)
    for batch in args.batch_sizes:
        payload = pickle.dumps(SceneBatch.draw(example_seeds(0, 0, 3, batch), "train", config=config))
        seconds = _timed(lambda: pickle.loads(payload), cpu, args.repeats)
        add("handoff", "cpu", batch, batch, seconds, bytes=len(payload), ms=round(seconds * 1e3, 2))

    for name in devices:
        device = torch.device(name)
        renderer = ShapeEditBatchRenderer(config, device)
        threads = torch.get_num_threads() if device.type == "cpu" else None
        for batch in args.batch_sizes:
            scenes = SceneBatch.draw(example_seeds(0, 0, 1, batch), "train", config=config)
            seconds = _timed(lambda: renderer.render_scenes(scenes), device, args.repeats)
            add("render_scenes", name, batch, batch, seconds, **({"threads": threads} if threads else {}))
            seeds = example_seeds(0, 0, 2, batch)
            seconds = _timed(lambda: renderer.render(seeds, "train"), device, max(1, args.repeats // 2))
            add("render", name, batch, batch, seconds, **({"threads": threads} if threads else {}))
            if workers and device.type == "cuda":
                stream = SceneBatchStream(batch, config=config)
                loader = iter(DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4))
                for _ in range(2 * workers):  # warm-up: workers started, queues filled
                    renderer.render_scenes(next(loader))
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                for _ in range(args.stream_batches):
                    renderer.render_scenes(next(loader))
                torch.cuda.synchronize(device)
                add("stream", name, batch, batch * args.stream_batches, time.perf_counter() - start, workers=workers)
                del loader

    meta = dict(
        benchmark="bench_data",
        commit=_commit(),
        torch=torch.__version__,
        python=platform.python_version(),
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        cuda_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        geometry=dict(frames=args.frames, height=args.height, width=args.width),
        date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    )
    write_json(args.json_path, dict(meta=meta, rows=rows))
    print(f"# wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
