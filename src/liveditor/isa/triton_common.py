"""Pieces shared by the ISA Triton kernels: block spans, the dot product, launch constants."""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

# Triton's CPU interpreter (used by the tests when no GPU is present) mis-reads bf16 operands of
# tl.dot, so under the interpreter every dot runs on fp32 copies of its operands. The products of
# bf16/fp16 values are exact in fp32, so this matches the tensor cores' fp32 accumulation.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The kernels work in base 2 (exp2/log2). Kernels may only read constexpr globals; host code reads `.value`.
LOG2E = tl.constexpr(math.log2(math.e))
LN2 = tl.constexpr(math.log(2.0))


def on_input_device(launcher):
    """Decorator: run `launcher` with the current CUDA device set to that of its first argument, a tensor."""

    @functools.wraps(launcher)
    def launch(x: torch.Tensor, *args, **kwargs):
        # Triton launches on the current CUDA device, not the tensors' (device_of: no-op for CPU tensors).
        with torch.cuda.device_of(x):
            return launcher(x, *args, **kwargs)

    return launch


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its rows are contiguous (the kernels take the other strides as arguments)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def leading_strides(*tensors: torch.Tensor) -> list[int]:
    """The first three strides of each tensor, in order: what the kernels take for a 4D tensor whose
    last dimension is contiguous (see last_dim_contiguous)."""
    return [s for t in tensors for s in t.stride()[:3]]


def input_unsupported_reason(q: torch.Tensor) -> str | None:
    """Why no Triton kernel here can take q (its device or dtype), or None: CUDA tensors, or any under
    the interpreter (tests); float16, bfloat16 or float32."""
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return f"inputs are on {q.device.type}, not CUDA"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not float16/bfloat16/float32"
    return None


def tile_rows(block_size: int) -> int:
    """Rows of a query/key tile: the block size rounded up to a power of two, at least 16 (tl.dot)."""
    return max(16, triton.next_power_of_2(block_size))


def tile_dims(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def block_span(blk, n_src, L_src, N, BLOCK_SIZE: tl.constexpr):
    """First token and true length of block `blk` (scalar or vector): source blocks, then context."""
    is_src = blk < n_src
    start = tl.where(is_src, blk * BLOCK_SIZE, L_src + (blk - n_src) * BLOCK_SIZE)
    limit = tl.where(is_src, L_src, N)
    length = tl.minimum(start + BLOCK_SIZE, limit) - start
    return start, length


@triton.jit
def _row_tile(X, sxb, sxh, sxn, bi, hi, start, length, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
              HEAD_DIM: tl.constexpr):
    """Pointers to rows [start, start + length) of (batch bi, head hi) of X (strides sxb, sxh, sxn; rows
    contiguous) as a BLOCK_M x BLOCK_D tile, and the mask of the entries inside them and HEAD_DIM."""
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    ptrs = X + bi.to(tl.int64) * sxb + hi.to(tl.int64) * sxh + (start + rows)[:, None].to(tl.int64) * sxn + dims[None, :]
    return ptrs, (rows < length)[:, None] & (dims < HEAD_DIM)[None, :]


@triton.jit
def load_rows(X, sxb, sxh, sxn, bi, hi, start, length, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
              HEAD_DIM: tl.constexpr):
    """Rows [start, start + length) of (batch bi, head hi) of X (strides sxb, sxh, sxn; rows contiguous)
    as a BLOCK_M x BLOCK_D tile, zero past them and past HEAD_DIM."""
    ptrs, mask = _row_tile(X, sxb, sxh, sxn, bi, hi, start, length, BLOCK_M, BLOCK_D, HEAD_DIM)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def store_rows(X, sxb, sxh, sxn, bi, hi, start, length, value, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """The first `length` rows of a BLOCK_M x BLOCK_D tile into rows [start, start + length) of (batch
    bi, head hi) of X (strides sxb, sxh, sxn; rows contiguous), cast to X's dtype: load_rows' inverse."""
    ptrs, mask = _row_tile(X, sxb, sxh, sxn, bi, hi, start, length, BLOCK_M, BLOCK_D, HEAD_DIM)
    tl.store(ptrs, value.to(X.dtype.element_ty), mask=mask)


@triton.jit
def mma(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation (IEEE fp32 for fp32 inputs instead of tf32)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)
