"""Wall time of `liveditor edit` with the bundled tiny model on the bundled example input.

Each run is a fresh `liveditor edit` process (model load, video read, the edit, mp4 write), as a
newcomer would type it. Prints a table (median and every run) and writes JSON.

    python benchmarks/bench_edit_cpu.py --runs 3 --json bench_edit_cpu.json
    python benchmarks/bench_edit_cpu.py --runs 3 --steps 16 --guidance 1   # other settings

CPU threads follow torch's default (all cores); pin them with --threads to mimic a smaller machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from liveditor.atomic import write_json


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--instruction", default="make the purple circle red")
    parser.add_argument("--steps", type=int, default=None, help="pass --steps (default: the CLI's default)")
    parser.add_argument("--guidance", type=float, default=None, help="pass --guidance (default: the CLI's default)")
    parser.add_argument("--attention", choices=("isa", "dense"), default=None)
    parser.add_argument("--threads", type=int, default=None, help="OMP/MKL threads for the edit process")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    from liveditor.demo import example_input_path

    example = example_input_path()
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    extra = []
    if args.steps is not None:
        extra += ["--steps", str(args.steps)]
    if args.guidance is not None:
        extra += ["--guidance", str(args.guidance)]
    if args.attention is not None:
        extra += ["--attention", args.attention]

    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            out = Path(tmp) / f"edit{run}.mp4"
            cmd = [sys.executable, "-m", "liveditor.cli", "edit", str(example), args.instruction, "-o", str(out),
                   "--device", "cpu", *extra]
            start = time.perf_counter()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            elapsed = time.perf_counter() - start
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
            seconds.append(elapsed)
            print(f"run {run + 1}: {elapsed:.1f} s  ({done.stdout.strip().splitlines()[-1]})", flush=True)

    result = {
        "command": "liveditor edit <bundled example> " + json.dumps(args.instruction) + " -o OUT --device cpu "
        + " ".join(extra),
        "runs_s": [round(s, 2) for s in seconds],
        "median_s": round(statistics.median(seconds), 2),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "load_average_after": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print()
    print("| setting | runs | median s | all runs s |")
    print("|---|---:|---:|---|")
    print(f"| {' '.join(extra) or 'CLI defaults'} | {len(seconds)} | {result['median_s']:.1f} | "
          f"{', '.join(f'{s:.1f}' for s in seconds)} |")
    if args.json_path:
        write_json(args.json_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
