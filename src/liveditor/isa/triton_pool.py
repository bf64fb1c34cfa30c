"""Triton kernel: fp32 mean-pooling of q, k, v over ISA blocks in one pass over each tensor."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import segment_blocks
from .triton_common import block_span, tile_dims, tile_rows


@triton.jit
def _pool_one(X, XC, sxb, sxh, sxn, bi, hi, bh, blk, start, length, nb,
              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < HEAD_DIM
    base = X + bi.to(tl.int64) * sxb + hi.to(tl.int64) * sxh
    x = tl.load(base + (start + rows)[:, None].to(tl.int64) * sxn + dims[None, :],
                mask=(rows < length)[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / length.to(tl.float32)
    tl.store(XC + (bh.to(tl.int64) * nb + blk) * HEAD_DIM + dims, mean, mask=dmask)


@triton.jit
def _pool_kernel(Q, K, V, QC, KC, VC,
                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                 H, N, L_src, n_src, nb,
                 BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    bi = bh // H
    hi = bh % H
    start, length = block_span(blk, n_src, L_src, N, BLOCK_SIZE)
    _pool_one(Q, QC, sqb, sqh, sqn, bi, hi, bh, blk, start, length, nb, BLOCK_M, BLOCK_D, HEAD_DIM)
    _pool_one(K, KC, skb, skh, skn, bi, hi, bh, blk, start, length, nb, BLOCK_M, BLOCK_D, HEAD_DIM)
    _pool_one(V, VC, svb, svh, svn, bi, hi, bh, blk, start, length, nb, BLOCK_M, BLOCK_D, HEAD_DIM)


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def pool_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_source: int, block_size: int):
    """Block means of q, k, v in fp32: three `[B, H, nb, D]` tensors (source and context blocked apart)."""
    B, H, N, D = q.shape
    n_src, n_ctx = segment_blocks(num_source, N - num_source, block_size)
    nb = n_src + n_ctx
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    qc, kc, vc = (torch.empty(B, H, nb, D, device=q.device, dtype=torch.float32) for _ in range(3))
    _pool_kernel[(nb, B * H)](
        q, k, v, qc, kc, vc,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        H, N, num_source, n_src, nb,
        BLOCK_SIZE=block_size, BLOCK_M=tile_rows(block_size), BLOCK_D=tile_dims(D), HEAD_DIM=D,
        num_warps=4,
    )
    return qc, kc, vc
