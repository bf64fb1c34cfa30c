"""Triton kernels: softmax attention over a few keys (a text prompt's tokens), forward and backward.

Cross-attention of the tiny model attends 2,048 video tokens per head to at most 32 text tokens.
SDPA's kernels tile the keys in 64s and more and keep separate passes for the backward's
bookkeeping; here every key of a head fits in one register tile, so a program reads its queries
once and the work is about the traffic of reading q and writing the output (forward), or reading q,
out and dout and writing dq (backward). On one H200 at the tiny model's training shape (batch 256,
bf16): 0.53 ms of device time per layer forward + backward against SDPA's (cuDNN) 1.33
(`benchmarks/bench_few_keys.py`, docs/benchmarks.md).

Layout: token-major `[B, N, H, D]` queries and `[B, L, H, D]` keys/values (diffusers' attention
layout: the projections' output, unflattened, with no copy). Everything in base 2 (exp2/log2); the
saved log-sum-exp is base 2 too (only these kernels read it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    INTERPRET,
    LOG2E,
    input_unsupported_reason,
    last_dim_contiguous,
    leading_strides,
    load_rows,
    mma,
    on_input_device,
    store_rows,
    tile_dims,
)

MAX_KEYS = 64  # keys of one head in one register tile
MAX_HEAD_DIM = 128


def unsupported_reason(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """Why these kernels cannot run `[B, N, H, D]` queries over `[B, L, H, D]` keys, or None."""
    reason = input_unsupported_reason(q)
    if reason is not None:
        return reason
    if k.shape[1] > MAX_KEYS:
        return f"{k.shape[1]} keys are over {MAX_KEYS}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} is over {MAX_HEAD_DIM}"
    return None


@triton.jit
def _few_keys_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh,
    H, N, L, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    first = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    bi = bh // H
    hi = bh % H
    keys = tl.arange(0, BLOCK_L)
    q = load_rows(Q, sqb, sqh, sqn, bi, hi, first, N - first, BLOCK_M, BLOCK_D, HEAD_DIM)
    k = load_rows(K, skb, skh, skn, bi, hi, 0, L, BLOCK_L, BLOCK_D, HEAD_DIM)
    v = load_rows(V, svb, svh, svn, bi, hi, 0, L, BLOCK_L, BLOCK_D, HEAD_DIM)
    s = mma(q, tl.trans(k), UPCAST, IEEE) * qk_scale
    s = tl.where((keys < L)[None, :], s, float("-inf"))
    m = tl.max(s, 1)
    p = tl.exp2(s - m[:, None])
    l_sum = tl.sum(p, 1)
    out = mma(p.to(v.dtype), v, UPCAST, IEEE) / l_sum[:, None]
    store_rows(O, sob, soh, son, bi, hi, first, N - first, out, BLOCK_M, BLOCK_D, HEAD_DIM)
    rows = first + tl.arange(0, BLOCK_M)
    tl.store(LSE + bh.to(tl.int64) * N + rows, m + tl.log2(l_sum), mask=rows < N)


@triton.jit
def _few_keys_bwd_kernel(
    Q, K, V, O, DO, LSE, DQ, DK_PART, DV_PART,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh, sdob, sdon, sdoh, sdqb, sdqn, sdqh,
    B, H, N, L, tiles_per_program, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    # One program: one (batch, head) and a run of query tiles; dk/dv of its keys accumulate in
    # registers and leave as one fp32 partial per program (summed on the host side: deterministic).
    split = tl.program_id(0)
    bh = tl.program_id(1)
    bi = bh // H
    hi = bh % H
    keys = tl.arange(0, BLOCK_L)
    dims = tl.arange(0, BLOCK_D)
    k = load_rows(K, skb, skh, skn, bi, hi, 0, L, BLOCK_L, BLOCK_D, HEAD_DIM)
    v = load_rows(V, svb, svh, svn, bi, hi, 0, L, BLOCK_L, BLOCK_D, HEAD_DIM)
    dk = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    for t in range(tiles_per_program):
        first = (split * tiles_per_program + t) * BLOCK_M
        rows = first + tl.arange(0, BLOCK_M)
        q = load_rows(Q, sqb, sqh, sqn, bi, hi, first, N - first, BLOCK_M, BLOCK_D, HEAD_DIM)
        do = load_rows(DO, sdob, sdoh, sdon, bi, hi, first, N - first, BLOCK_M, BLOCK_D, HEAD_DIM)
        o = load_rows(O, sob, soh, son, bi, hi, first, N - first, BLOCK_M, BLOCK_D, HEAD_DIM)
        lse = tl.load(LSE + bh.to(tl.int64) * N + rows, mask=rows < N, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        s = mma(q, tl.trans(k), UPCAST, IEEE) * qk_scale
        # Rows past N hold zero q and dout: their p is finite and their ds zero, so they add nothing.
        p = tl.where((keys < L)[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dv += mma(tl.trans(p.to(do.dtype)), do, UPCAST, IEEE)
        dp = mma(do, tl.trans(v), UPCAST, IEEE)
        ds = p * (dp - delta[:, None])
        dq = mma(ds.to(k.dtype), k, UPCAST, IEEE) * scale
        store_rows(DQ, sdqb, sdqh, sdqn, bi, hi, first, N - first, dq, BLOCK_M, BLOCK_D, HEAD_DIM)
        dk += mma(tl.trans(ds.to(q.dtype)), q, UPCAST, IEEE)

    part = (split.to(tl.int64) * B * H + bh) * BLOCK_L * BLOCK_D + keys[:, None] * BLOCK_D + dims[None, :]
    tl.store(DK_PART + part, dk * scale)
    tl.store(DV_PART + part, dv)


# Launch options, from `benchmarks/bench_few_keys.py --sweep` (one H200, the tiny model's training
# shape, device time; docs/benchmarks.md): forward + backward 0.53 ms against 0.55-1.07 for the other
# 35 options. The forward gives each program one query tile; the backward gives each program a run of
# tiles (dk/dv stay in registers across it). More programs per (batch, head) than the device needs only
# add fp32 partials to write and sum: a batch of 256 x 4 heads fills the device with one each.
FORWARD_OPTIONS = dict(BLOCK_M=128, num_warps=4)
BACKWARD_OPTIONS = dict(BLOCK_M=64, num_warps=4, num_stages=3)
BACKWARD_PROGRAMS_PER_SM = 2


def _meta(q: torch.Tensor, L: int, options: dict) -> dict:
    D = q.shape[-1]
    block_d = tile_dims(D)
    return dict(
        options,
        BLOCK_M=options["BLOCK_M"] if block_d <= 64 else 64,
        BLOCK_L=max(16, triton.next_power_of_2(L)),
        BLOCK_D=block_d,
        HEAD_DIM=D,
        UPCAST=INTERPRET,
        IEEE=q.dtype == torch.float32,
    )


@on_input_device
def few_keys_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """out `[B, N, H, D]` (q's dtype, contiguous) and base-2 lse `[B, H, N]` fp32."""
    B, N, H, D = q.shape
    L = k.shape[1]
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    out = torch.empty(B, N, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    meta = _meta(q, L, FORWARD_OPTIONS)
    grid = (triton.cdiv(N, meta["BLOCK_M"]), B * H)
    _few_keys_fwd_kernel[grid](
        q, k, v, out, lse,
        *leading_strides(q, k, v, out), H, N, L, scale * LOG2E.value, **meta,
    )
    return out, lse


def backward_splits(B: int, H: int, n_tiles: int, device: torch.device) -> int:
    """Programs per (batch, head): BACKWARD_PROGRAMS_PER_SM for every SM, at most one per tile."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(n_tiles, triton.cdiv(BACKWARD_PROGRAMS_PER_SM * sms, B * H)))


@on_input_device
def few_keys_backward(dout, q, k, v, out, lse, scale: float, splits: int | None = None):
    """dq `[B, N, H, D]`, dk, dv `[B, L, H, D]` (inputs' dtype, contiguous).

    splits: programs per (batch, head), each over a run of query tiles (default: backward_splits).
    """
    B, N, H, D = q.shape
    L = k.shape[1]
    dout, q, k, v, out = (last_dim_contiguous(x) for x in (dout, q, k, v, out))
    meta = _meta(q, L, BACKWARD_OPTIONS)
    n_tiles = triton.cdiv(N, meta["BLOCK_M"])
    splits = min(n_tiles, splits or backward_splits(B, H, n_tiles, q.device))
    tiles_per_program = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_program)
    dq = torch.empty(B, N, H, D, device=q.device, dtype=q.dtype)
    part_shape = (splits, B, H, meta["BLOCK_L"], meta["BLOCK_D"])
    dk_part = torch.empty(part_shape, device=q.device, dtype=torch.float32)
    dv_part = torch.empty(part_shape, device=q.device, dtype=torch.float32)
    _few_keys_bwd_kernel[(splits, B * H)](
        q, k, v, out, dout, lse, dq, dk_part, dv_part,
        *leading_strides(q, k, v, out, dout, dq),
        B, H, N, L, tiles_per_program, scale * LOG2E.value, scale, **meta,
    )
    dk, dv = (part.sum(0)[:, :, :L, :D].transpose(1, 2).to(k.dtype).contiguous() for part in (dk_part, dv_part))
    return dq, dk, dv


# ------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("liveditor::few_key_attention", mutates_args=())
def few_key_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[
    torch.Tensor, torch.Tensor
]:
    return few_keys_forward(q, k, v, scale)


@few_key_attention_op.register_fake
def _few_key_attention_fake(q, k, v, scale):
    B, N, H, D = q.shape
    return q.new_empty(B, N, H, D), q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("liveditor::few_key_attention_backward", mutates_args=())
def few_key_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  out: torch.Tensor, lse: torch.Tensor, scale: float) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor
]:
    return few_keys_backward(dout, q, k, v, out, lse, scale)


@few_key_attention_backward_op.register_fake
def _few_key_attention_backward_fake(dout, q, k, v, out, lse, scale):
    # new_empty: fresh contiguous gradients whatever the inputs' strides (inductor checks them).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = few_key_attention_backward_op(dout, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


few_key_attention_op.register_autograd(_backward, setup_context=_setup)
