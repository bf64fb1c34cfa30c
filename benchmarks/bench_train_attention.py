"""Attention kernels at the tiny LIVEditor's training shape, on one CUDA GPU: how fast can the
attention of one training step be?

Self-attention over `[source | context]` (B=256 clips, 4 heads of 64, 2,048 tokens) and the
cross-attention to the instruction (24 text tokens), forward and forward+backward, through each
SDPA backend, with inputs laid out as the model passes them ([B, N, H, D] views) and contiguous.
Milliseconds per call (synchronised wall time, after warm-up) and TFLOP/s (forward 4·B·H·Nq·Nk·D FLOPs,
backward 2.5x that).

    python benchmarks/bench_train_attention.py --json bench_train_attention.json
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from liveditor.atomic import write_json
from transformer_step import SDPA_BACKENDS, run_metadata, timed

BACKENDS = ("cudnn", "flash", "efficient")  # SDPA's math backend would materialise 2,048^2 scores per head


def milliseconds(fn, iters: int) -> float:
    for _ in range(3):  # warm-up
        fn()
    return 1e3 * timed(fn, torch.device("cuda"), iters)


def measure(kind: str, layout: str, backend: str, batch: int, heads: int, queries: int, keys: int, head_dim: int,
            iters: int, generator: torch.Generator) -> dict:
    def tensor(tokens):
        shape = (batch, heads, tokens, head_dim) if layout == "contiguous" else (batch, tokens, heads, head_dim)
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_()

    q, k, v = tensor(queries), tensor(keys), tensor(keys)
    grad = torch.randn(batch, heads, queries, head_dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    heads_first = (lambda x: x) if layout == "contiguous" else (lambda x: x.transpose(1, 2))

    def forward():
        return F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v))

    def forward_backward():
        forward().backward(grad)

    flop = 4 * batch * heads * queries * keys * head_dim
    row = {"kind": kind, "layout": layout, "backend": backend}
    try:
        with sdpa_kernel(SDPA_BACKENDS[backend]):
            fwd, both = milliseconds(forward, iters), milliseconds(forward_backward, iters)
    except RuntimeError as exc:  # a backend that refuses the shape is a row, not the end of the run
        return {**row, "error": str(exc).splitlines()[0][:200]}
    return {**row, "fwd_ms": fwd, "fwd_bwd_ms": both, "fwd_tflop_per_s": flop / fwd / 1e9,
            "fwd_bwd_tflop_per_s": 3.5 * flop / both / 1e9}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=2048, help="source + context tokens per clip")
    parser.add_argument("--text-tokens", type=int, default=24)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")

    generator = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for kind, keys in (("self", args.tokens), ("cross", args.text_tokens)):
        for layout in ("model views", "contiguous"):
            for backend in BACKENDS:
                rows.append(measure(kind, layout, backend, args.batch, args.heads, args.tokens, keys, args.head_dim,
                                    args.iters, generator))
    result = {**run_metadata(torch.device("cuda")), "shape": vars(args) | {"json_path": None}, "rows": rows}
    print(f"{result['device']}, torch {result['torch']}: B={args.batch}, H={args.heads}, D={args.head_dim}, "
          f"{args.tokens} tokens, {args.text_tokens} text tokens, bf16")
    print("| attention | layout | backend | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['kind']} | {r['layout']} | {r['backend']} | {r['error']} | | | |")
        else:
            print(f"| {r['kind']} | {r['layout']} | {r['backend']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} "
                  f"| {r['fwd_tflop_per_s']:.0f} | {r['fwd_bwd_tflop_per_s']:.0f} |")
    if args.json_path:
        write_json(args.json_path, result)
        print(f"wrote {args.json_path}")
    return result


if __name__ == "__main__":
    main()
