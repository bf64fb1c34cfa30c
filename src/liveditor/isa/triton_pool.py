"""Triton kernel: fp32 mean-pooling of q, k, v over ISA blocks in one pass over each tensor."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import segment_blocks
from .triton_common import block_span, on_input_device, tile_dims, tile_rows

# Elements of one program's tile per tensor: a program pools as many heads of one block as fit.
POOL_TILE_ELEMENTS = 8192


@triton.jit
def _pool_one(X, XC, sxb, sxh, sxn, bi, heads, H, blk, start, length, nb,
              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)[:, None, None]
    dims = tl.arange(0, BLOCK_D)
    hd_mask = (heads < H)[:, None] & (dims < HEAD_DIM)[None, :]  # [BLOCK_H, BLOCK_D]
    ptrs = (X + bi.to(tl.int64) * sxb + heads[None, :, None].to(tl.int64) * sxh
            + (start + rows).to(tl.int64) * sxn + dims[None, None, :])
    x = tl.load(ptrs, mask=(rows < length) & hd_mask[None, :, :], other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / length.to(tl.float32)  # [BLOCK_H, BLOCK_D]
    out = XC + ((bi.to(tl.int64) * H + heads[:, None]) * nb + blk) * HEAD_DIM + dims[None, :]
    tl.store(out, mean, mask=hd_mask)


@triton.jit
def _pool_kernel(Q, K, V, QC, KC, VC,
                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                 H, N, L_src, n_src, nb,
                 BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                 HEAD_DIM: tl.constexpr):
    """One block of one batch element, BLOCK_H heads at once: with the model's [B, N, H, D] memory
    a token's heads are contiguous, so each row of the tile is one coalesced read."""
    blk = tl.program_id(0)
    bi = tl.program_id(1)
    heads = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    start, length = block_span(blk, n_src, L_src, N, BLOCK_SIZE)
    _pool_one(Q, QC, sqb, sqh, sqn, bi, heads, H, blk, start, length, nb, BLOCK_M, BLOCK_D, HEAD_DIM)
    _pool_one(K, KC, skb, skh, skn, bi, heads, H, blk, start, length, nb, BLOCK_M, BLOCK_D, HEAD_DIM)
    _pool_one(V, VC, svb, svh, svn, bi, heads, H, blk, start, length, nb, BLOCK_M, BLOCK_D, HEAD_DIM)


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def pool_heads(num_heads: int, block_size: int, head_dim: int) -> int:
    """Heads per pooling program: all of them while the tile stays within POOL_TILE_ELEMENTS."""
    fit = max(1, POOL_TILE_ELEMENTS // (tile_rows(block_size) * tile_dims(head_dim)))
    return min(triton.next_power_of_2(num_heads), 1 << (fit.bit_length() - 1))  # a power of two <= fit


@on_input_device
def pool_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_source: int, block_size: int):
    """Block means of q, k, v in fp32: three `[B, H, nb, D]` tensors (source and context blocked apart)."""
    B, H, N, D = q.shape
    n_src, n_ctx = segment_blocks(num_source, N - num_source, block_size)
    nb = n_src + n_ctx
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    qc, kc, vc = (torch.empty(B, H, nb, D, device=q.device, dtype=torch.float32) for _ in range(3))
    block_h = pool_heads(H, block_size, D)
    _pool_kernel[(nb, B, triton.cdiv(H, block_h))](
        q, k, v, qc, kc, vc,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        H, N, num_source, n_src, nb,
        BLOCK_SIZE=block_size, BLOCK_M=tile_rows(block_size), BLOCK_H=block_h, BLOCK_D=tile_dims(D), HEAD_DIM=D,
        num_warps=4,
    )
    return qc, kc, vc
