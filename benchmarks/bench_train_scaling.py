"""Training throughput of the real loop on 1, 2, ... GPUs of one host: `liveditor train` under
torchrun (accelerate DDP), data included, for each process count in one run.

Each count trains the same config from scratch for `--seconds` of training (no validation, no
checkpoints in between); the rate is the mean over the log windows after the first `--skip`
(compilation and warm-up). Scaling = clips/s of N processes / clips/s of 1 process, same run.

    python benchmarks/bench_train_scaling.py --processes 1 2 4 --json scaling.json \
        --set data.renderer='"batch"' --set train.batch_size=256
    python benchmarks/bench_train_scaling.py --processes 1 2 --device cpu --seconds 20 \
        --config configs/tiny-shapeedit-cpu.toml --set train.batch_size=2      # smoke test (gloo)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from liveditor.atomic import write_json

REPO = Path(__file__).resolve().parents[1]


def run_count(processes: int, args, workdir: Path) -> dict:
    output_dir = workdir / f"p{processes}"
    overrides = list(args.overrides) + [
        f"train.max_time_s={args.seconds}", "train.val_every=0", "train.checkpoint_every=1000000",
        f"train.log_every={args.log_every}", "train.max_steps=1000000",
    ]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "liveditor.cli", "train", "--config", args.config, "--output-dir", str(output_dir),
               "--no-resume", "--no-export", "--quiet"]
    for item in overrides:
        command += ["--set", item]
    env = dict(os.environ)
    if args.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"  # what `accelerate launch --cpu` sets: gloo processes
        env["CUDA_VISIBLE_DEVICES"] = ""
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        tail = "\n".join((completed.stdout + completed.stderr).splitlines()[-25:])
        raise SystemExit(f"training with {processes} process(es) failed (exit {completed.returncode}):\n{tail}")
    rows = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    start = next(r for r in rows if r.get("event") == "start")
    if start["processes"] != processes:
        raise SystemExit(f"asked for {processes} processes, the loop ran {start['processes']}")
    windows = [r for r in rows if "event" not in r]
    steady = windows[args.skip:]
    if not steady:
        raise SystemExit(f"{processes} process(es): only {len(windows)} log windows in {args.seconds} s; "
                         f"raise --seconds or lower --log-every")
    seconds = sum(w["window_s"] for w in steady)
    clips = sum(w["clips_per_s"] * w["window_s"] for w in steady)
    return {
        "processes": processes,
        "device": start["device"],
        "batch_per_process": start["config"]["train"]["batch_size"],
        "attention": start["attention"],
        "compile": start["compile"],
        "windows": len(steady),
        "clips_per_s": clips / seconds,
        "tflop_per_s": clips / seconds * start["training_gflop_per_clip"] / 1e3,
        "data_wait_s_per_window": sum(w["data_wait_s"] for w in steady) / len(steady),
        "window_s": seconds / len(steady),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny-shapeedit.toml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="training time of each count (compilation counts too: keep >= 60 s on a GPU)")
    parser.add_argument("--log-every", type=int, default=20, help="steps per log window")
    parser.add_argument("--skip", type=int, default=1, help="log windows left out (compilation, warm-up)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    if sorted(args.processes)[0] < 1:
        raise SystemExit("--processes must be >= 1")

    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_scaling_") as workdir:
        for n in args.processes:
            rows.append(run_count(n, args, Path(workdir)))
            # A count's figures as soon as it ends: a run stopped by a time limit keeps them.
            print(f"{n} process(es): {rows[-1]['clips_per_s']:.0f} clips/s over {rows[-1]['windows']} windows", flush=True)
    base = next((r["clips_per_s"] for r in rows if r["processes"] == 1), None)
    for row in rows:
        row["scaling_vs_1"] = row["clips_per_s"] / base if base else None

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": rows[0]["device"],
        "gpus_on_host": torch.cuda.device_count() if args.device == "cuda" else 0,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                 text=True).stdout.strip() or None,
        "config": args.config,
        "overrides": args.overrides,
        "seconds": args.seconds,
    }
    print(f"# training throughput, {meta['device']}, {meta['date']}")
    print("| processes | batch/process | attention | compile | clips/s | model TFLOP/s | scaling vs 1 | data wait s/window |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        scaling = f"{r['scaling_vs_1']:.2f}x" if r["scaling_vs_1"] else "-"
        print(f"| {r['processes']} | {r['batch_per_process']} | {r['attention']} | {r['compile']} | "
              f"{r['clips_per_s']:.0f} | {r['tflop_per_s']:.0f} | {scaling} | {r['data_wait_s_per_window']:.2f} |")
    if args.json_path:
        write_json(args.json_path, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
