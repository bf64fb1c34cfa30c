"""Text cross-attention: `liveditor.isa.few_key_attention`'s Triton kernels against SDPA (its own
backend choice, cuDNN on Hopper) on the same inputs, forward and forward + backward. Prints a table
and writes JSON.

Times are device milliseconds per call: the sum of every GPU kernel the call launches (profiler),
which is what a compiled training step spends, its host running ahead. Wall-clock time per call is
reported too; at these sizes it is the host's (Python, autograd and launch overhead), not the GPU's.

    python benchmarks/bench_few_keys.py --json bench_few_keys.json     # the tiny model's training shape
    python benchmarks/bench_few_keys.py --sweep --batch 256 --keys 24    # the backward's launch options

--sweep also times the kernels' forward + backward under each backward launch option (tile rows,
stages, programs per SM; `triton_few_keys.BACKWARD_OPTIONS` / `BACKWARD_PROGRAMS_PER_SM`) on the
first shape, against the package's choice.

Inputs are laid out as the model makes them (`[B, tokens, H, D]` views of the projections' output).
Every row also reports the largest difference of the kernels' output and gradients from SDPA's.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from torch.profiler import ProfilerActivity, profile

from liveditor.atomic import write_json
from liveditor.isa import few_key_attention, triton_few_keys
from transformer_step import run_metadata, timed


def device_ms(fn, repeats: int) -> float:
    """GPU kernel milliseconds per call of `fn` (all kernels it launches, summed)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.self_device_time_total for e in kernels) / 1e3 / repeats


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 16])
    parser.add_argument("--tokens", type=int, default=2048, help="query tokens (source + context)")
    parser.add_argument("--keys", type=int, nargs="+", default=[24, 32], help="text tokens")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also sweep the backward's launch options")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_few_keys.py needs a CUDA GPU")

    device = torch.device("cuda")
    H, D, N = args.heads, args.head_dim, args.tokens
    rows = []
    for B in args.batch:
        for L in args.keys:
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(B, N, H * D, device=device, generator=g, dtype=torch.bfloat16).unflatten(2, (H, D))
            kv = torch.randn(B, L, 2 * H * D, device=device, generator=g, dtype=torch.bfloat16)
            k, v = (x.unflatten(2, (H, D)) for x in kv.chunk(2, dim=-1))  # fused to_kv's strided halves
            dout = torch.randn(B, N, H, D, device=device, generator=g, dtype=torch.bfloat16)
            row = {"batch": B, "queries": N, "keys": L, "heads": H, "head_dim": D}
            results = {}
            for backend in ("torch", "triton"):
                leaves = [x.detach().requires_grad_() for x in (q, k, v)]

                def forward(backend=backend, leaves=leaves):
                    with torch.no_grad():
                        return few_key_attention(*leaves, backend=backend)

                def forward_backward(backend=backend, leaves=leaves):
                    out = few_key_attention(*leaves, backend=backend)
                    return (out, *torch.autograd.grad(out, leaves, dout))

                results[backend] = forward_backward()
                for fn in (forward, forward_backward):  # warm-up: compilation, cuDNN plans
                    fn()
                for kind, fn in (("forward", forward), ("forward_backward", forward_backward)):
                    row[f"{backend}_{kind}_ms"] = device_ms(fn, args.repeats)
                    row[f"{backend}_{kind}_wall_ms"] = timed(fn, device, args.repeats) * 1e3
            row["max_diff"] = max((a.float() - b.float()).abs().max().item()
                                  for a, b in zip(results["triton"], results["torch"]))
            for kind in ("forward", "forward_backward"):
                row[f"speedup_{kind}"] = row[f"torch_{kind}_ms"] / row[f"triton_{kind}_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)

    sweep = backward_sweep(args, device) if args.sweep else []
    result = {**run_metadata(device), "rows": rows, "backward_sweep": sweep}
    print(f"\n{result['device']}, commit {result['commit']}, bf16, {N} queries, H={H}, D={D}: device ms per call "
          "(wall ms per call)")
    print("| batch | keys | SDPA fwd | Triton fwd | ratio | SDPA fwd+bwd | Triton fwd+bwd | ratio | max diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for kind in ("forward", "forward_backward"):
            cells += [f"{r[f'{b}_{kind}_ms']:.3f} ({r[f'{b}_{kind}_wall_ms']:.2f})" for b in ("torch", "triton")]
            cells.append(f"{r[f'speedup_{kind}']:.2f}x")
        print(f"| {r['batch']} | {r['keys']} | " + " | ".join(cells) + f" | {r['max_diff']:.2g} |")
    if sweep:
        print(f"\nbackward launch options, batch {args.batch[0]}, {args.keys[0]} keys: Triton fwd+bwd device ms")
        print("| tile rows | warps | stages | programs per SM | fwd+bwd device ms | max diff vs package |")
        print("|---|---|---|---|---|---|")
        for r in sweep:
            print(f"| {r['BLOCK_M']} | {r['num_warps']} | {r['num_stages']} | {r['programs_per_sm']} | "
                  f"{r['forward_backward_ms']:.3f}{' (package)' if r['package'] else ''} | {r['max_diff']:.2g} |")
    if args.json_path:
        write_json(args.json_path, result)  # atomically: an interrupted run leaves any earlier file whole
        print(f"wrote {args.json_path}")
    return result


def backward_sweep(args, device) -> list[dict]:
    B, L, H, D, N = args.batch[0], args.keys[0], args.heads, args.head_dim, args.tokens
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(B, n, H, D, device=device, generator=g, dtype=torch.bfloat16)
                     for n in (N, L, L, N))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def forward_backward():
        out = few_key_attention(*leaves, backend="triton")
        return (out, *torch.autograd.grad(out, leaves, dout))

    package = (dict(triton_few_keys.BACKWARD_OPTIONS), triton_few_keys.BACKWARD_PROGRAMS_PER_SM)
    reference = forward_backward()
    candidates = [package] + [(dict(BLOCK_M=m, num_warps=w, num_stages=st), p) for m, w, st, p in
                              itertools.product((64, 128), (4, 8), (1, 2, 3), (2, 8, 32))]
    rows = []
    try:
        for options, per_sm in candidates:
            triton_few_keys.BACKWARD_OPTIONS, triton_few_keys.BACKWARD_PROGRAMS_PER_SM = options, per_sm
            results = forward_backward()
            row = {**options, "programs_per_sm": per_sm, "package": (options, per_sm) == package and not rows,
                   "max_diff": max((a.float() - b.float()).abs().max().item() for a, b in zip(results, reference)),
                   "forward_backward_ms": device_ms(forward_backward, args.repeats)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        triton_few_keys.BACKWARD_OPTIONS, triton_few_keys.BACKWARD_PROGRAMS_PER_SM = package
    return rows


if __name__ == "__main__":
    main()
