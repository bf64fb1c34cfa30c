"""Launch options of ISA's block-sparse Triton kernels: device milliseconds of each kernel (forward
Taylor group, dq, dk/dv, pooled-key gradients) for every (num_warps, num_stages) asked for, against
the package's own choice (`triton_sparse._launch_options`), on one shape. The exact group runs on
cuDNN, as in training. Prints a table and writes JSON.

    python benchmarks/bench_isa_launch.py --json bench_isa_launch.json              # the tiny model's training shape
    python benchmarks/bench_isa_launch.py --batch 1 --heads 40 --source 32640 --context 32640 --head-dim 128 \\
        --block-size 64 --select-ratio 0.125 --full-ratio 0.05 --exact-ratio 0.1  # a 14B-like shape

Every row's outputs and gradients are compared with the package's choice (`max_diff`): the options
change speed, not results (beyond accumulation order).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from torch.profiler import ProfilerActivity, profile

from liveditor.atomic import write_json
from liveditor.isa import ISAConfig, ops
from liveditor.isa import triton_sparse
from liveditor.isa.config import block_counts
from transformer_step import run_metadata

KERNELS = ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd_pooled_kernel")


def kernel_ms(fn, reps: int) -> dict:
    """Device ms per call of each ISA kernel that `fn` launches (after two warm-up calls)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times = {e.key: e.self_device_time_total / 1e3 / reps for e in prof.key_averages()}
    return {name: times.get(name) for name in KERNELS}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--source", type=int, default=1024)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--select-ratio", type=float, default=0.5)
    parser.add_argument("--full-ratio", type=float, default=0.4)
    parser.add_argument("--exact-ratio", type=float, default=0.0625)
    parser.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_isa_launch.py needs a CUDA GPU")

    torch.manual_seed(0)
    B, H, L_src, D, b = args.batch, args.heads, args.source, args.head_dim, args.block_size
    config = ISAConfig(block_size=b, select_ratio=args.select_ratio, full_ratio=args.full_ratio,
                       exact_ratio=args.exact_ratio, sharpness="energy")
    # The model's memory: [B, N, H, D] seen as [B, H, N, D].
    q, k, v = (torch.randn(B, L_src + args.context, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    scale = D ** -0.5
    n_full = block_counts(L_src, args.context, config).num_full
    with torch.no_grad():
        plan = ops.plan_isa(q, k, v, L_src, config, scale)
        exact_out = ops.exact_group_dense(q, k, v, plan.query_order, plan.selected32, L_src, b, n_full, scale, "cudnn")
    tables = (q, k, v, plan.pooled_k, plan.pooled_v, plan.kept32, plan.query_order, plan.exact_lists, plan.exact_mask)
    split = (L_src, b, n_full, scale)

    def forward():
        return triton_sparse.sparse_forward(*tables, exact_out, *split)

    out, lse = forward()
    dout = torch.randn_like(out)
    reference = [out, *triton_sparse.sparse_backward(dout, *tables, out, lse, True, *split)]

    def step():
        o, s = forward()
        return [o, *triton_sparse.sparse_backward(dout, *tables, o, s, True, *split)]

    package_choice = triton_sparse._launch_options
    rows = []
    candidates = [None] + list(itertools.product(args.warps, args.stages))
    try:
        for candidate in candidates:
            if candidate is None:
                triton_sparse._launch_options = package_choice
                label = {kernel: package_choice(b, D, kernel) for kernel in ("forward", "dq", "dkdv", "pooled")}
            else:
                warps, stages = candidate
                triton_sparse._launch_options = lambda *_, w=warps, s=stages: dict(num_warps=w, num_stages=s)
                label = {"num_warps": warps, "num_stages": stages}
            results = step()
            diff = max((x.float() - r.float()).abs().max().item() for x, r in zip(results, reference))
            row = {"options": "package" if candidate is None else label, "package_options": label if candidate is None
                   else None, "max_diff": diff, **kernel_ms(step, args.reps)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        triton_sparse._launch_options = package_choice

    result = {**run_metadata(torch.device("cuda")), "shape": dict(B=B, H=H, L_src=L_src, L_ctx=args.context, D=D),
              "isa_config": dict(block_size=b, select_ratio=args.select_ratio, full_ratio=args.full_ratio,
                                 exact_ratio=args.exact_ratio), "rows": rows}
    print(f"\n{result['device']}, commit {result['commit']}, B={B} H={H} L_src={L_src} L_ctx={args.context} D={D} "
          f"block {b}: ms per call")
    print("| options | " + " | ".join(KERNELS) + " | max diff |")
    print("|---" * (len(KERNELS) + 2) + "|")
    for row in rows:
        name = "package" if row["options"] == "package" else f"{row['options']['num_warps']} warps, {row['options']['num_stages']} stages"
        cells = " | ".join("-" if row[k] is None else f"{row[k]:.3f}" for k in KERNELS)
        print(f"| {name} | {cells} | {row['max_diff']:.2g} |")
    if args.json_path:
        write_json(args.json_path, result)  # atomically: an interrupted run leaves any earlier file whole
        print(f"wrote {args.json_path}")
    return result


if __name__ == "__main__":
    main()
