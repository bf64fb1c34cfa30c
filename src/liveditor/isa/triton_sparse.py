"""Triton kernels: ISA's block-sparse attention (exact and 0th-order Taylor groups), forward and backward.

Query blocks are listed per (batch, head) in `query_order`: the first `num_full` are the exact group,
the rest the Taylor group. A Taylor block attends, under one online softmax, to the tokens of its
`n_exact` exact key blocks (`exact_lists`, indices into the kept list) and to the pooled key of
every other kept block with logit bias log(block length) (`exact_mask` marks the exact ones). An
exact block attends to every token of every kept block; when a dense kernel already computed the
exact group (`exact_out`), its rows are only scattered into place. Tokens are read and written
in place (no gathered copies), so block gathers and the final scatter are fused into the kernels.

Everything runs in the base-2 domain (logits times log2(e)); the saved log-sum-exp is natural.
Backward recomputes probabilities from the saved log-sum-exp (FlashAttention style): one kernel
for dq (per query block; it also forms rowsum(dout * out) for the others), one for dk/dv of exact key blocks (per kept block, over the query blocks
that use it exactly) and one for the pooled keys/values (per chunk of kept blocks, over the Taylor
query blocks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import segment_blocks
from .triton_common import (
    INTERPRET,
    LN2,
    LOG2E,
    block_span,
    last_dim_contiguous,
    leading_strides,
    load_rows,
    mma,
    on_input_device,
    tile_dims,
    tile_rows,
)

POOLED_CHUNK = 64  # pooled keys per step of the Taylor loop


@triton.jit
def _load_pooled(XP, bh, pidx, n_kv, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    ptrs = XP + (bh.to(tl.int64) * n_kv + pidx)[:, None] * HEAD_DIM + dims[None, :]
    return tl.load(ptrs, mask=(pidx < n_kv)[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _fwd_kernel(
    Q, K, V, KP, VP, KEPT, QORDER, ELIST, EMASK, O, LSE,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, N, L_src, n_src, nb, n_kv, n_full, n_exact, first_group, qk_scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_P: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    g = first_group + tl.program_id(0)
    bh = tl.program_id(1)
    bi = bh // H
    hi = bh % H
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    pcols = tl.arange(0, BLOCK_P)
    qb = tl.load(QORDER + bh * nb + g)
    q_start, q_len = block_span(qb, n_src, L_src, N, BLOCK_SIZE)
    q = load_rows(Q, sqb, sqh, sqn, bi, hi, q_start, q_len, BLOCK_M, BLOCK_D, HEAD_DIM)

    is_exact = g < n_full
    n_blocks = tl.where(is_exact, n_kv, n_exact)
    n_chunks = tl.where(is_exact, 0, tl.cdiv(n_kv, BLOCK_P))
    list_base = ELIST + (bh.to(tl.int64) * nb + qb) * n_exact

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for e in range(n_blocks):
        listed = tl.load(list_base + tl.minimum(e, n_exact - 1))
        kidx = tl.where(is_exact, e, listed)
        kb = tl.load(KEPT + bh * n_kv + kidx)
        k_start, k_len = block_span(kb, n_src, L_src, N, BLOCK_SIZE)
        k = load_rows(K, skb, skh, skn, bi, hi, k_start, k_len, BLOCK_M, BLOCK_D, HEAD_DIM)
        s = mma(q, tl.trans(k), UPCAST, IEEE) * qk_scale
        s = tl.where((rows < k_len)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_rows(V, svb, svh, svn, bi, hi, k_start, k_len, BLOCK_M, BLOCK_D, HEAD_DIM)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST, IEEE)
        m_i = m_new

    mask_base = EMASK + (bh.to(tl.int64) * nb + qb) * n_kv
    for c in range(n_chunks):
        pidx = c * BLOCK_P + pcols
        pvalid = pidx < n_kv
        kp = _load_pooled(KP, bh, pidx, n_kv, BLOCK_D, HEAD_DIM)
        kb = tl.load(KEPT + bh * n_kv + pidx, mask=pvalid, other=0)
        _, p_len = block_span(kb, n_src, L_src, N, BLOCK_SIZE)
        exact = tl.load(mask_base + pidx, mask=pvalid, other=1)
        s = mma(q, tl.trans(kp), UPCAST, IEEE) * qk_scale + tl.log2(p_len.to(tl.float32))[None, :]
        s = tl.where((pvalid & (exact == 0))[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vp = _load_pooled(VP, bh, pidx, n_kv, BLOCK_D, HEAD_DIM)
        acc = acc * alpha[:, None] + mma(p.to(vp.dtype), vp, UPCAST, IEEE)
        m_i = m_new

    out = acc / l_i[:, None]
    row_ok = rows < q_len
    o_ptrs = O + bh.to(tl.int64) * N * HEAD_DIM + (q_start + rows)[:, None].to(tl.int64) * HEAD_DIM + dims[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dims < HEAD_DIM)[None, :])
    tl.store(LSE + bh.to(tl.int64) * N + q_start + rows, (m_i + tl.log2(l_i)) * LN2, mask=row_ok)


@triton.jit
def _move_rows_kernel(
    SRC, DST, QORDER, stb, sth, stn, H, N, L_src, n_src, nb, n_full, TO_TOKENS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Exact-group query rows between packed `[B, H, n_full*b, D]` (query_order) and token order.

    TO_TOKENS: packed -> tokens (output scatter); programs past the exact group (g >= n_full),
    where launched, write zeros to their blocks' tokens. Else tokens -> packed, padding rows zeroed.
    (stb, sth, stn): strides of the token-ordered tensor; the packed one is contiguous.
    """
    g = tl.program_id(0)
    bh = tl.program_id(1)
    bi = bh // H
    hi = bh % H
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    qb = tl.load(QORDER + bh * nb + g)
    start, length = block_span(qb, n_src, L_src, N, BLOCK_SIZE)
    dmask = (dims < HEAD_DIM)[None, :]
    packed = (bh.to(tl.int64) * n_full * BLOCK_SIZE + g * BLOCK_SIZE + rows)[:, None] * HEAD_DIM + dims[None, :]
    tokens = bi.to(tl.int64) * stb + hi.to(tl.int64) * sth + (start + rows)[:, None].to(tl.int64) * stn + dims[None, :]
    valid = (rows < length)[:, None] & dmask
    if TO_TOKENS:
        packed_len = tl.where(g < n_full, length, 0)
        x = tl.load(SRC + packed, mask=(rows < packed_len)[:, None] & dmask, other=0.0)
        tl.store(DST + tokens, x, mask=valid)
    else:
        x = tl.load(SRC + tokens, mask=valid, other=0.0)
        tl.store(DST + packed, x, mask=(rows < BLOCK_SIZE)[:, None] & dmask)


@triton.jit
def _pack_kept_kernel(
    K, V, K_PACKED, V_PACKED, SELECTED, skb, skh, skn, svb, svh, svn, H, N, L_src, n_src, n_sel,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Kept keys/values from token order (K, V with the given strides) into the dense kernel's packed
    `[B, H, L_src + n_sel*b, D]`: all source tokens, then the selected context blocks (padding rows zero).
    One program per packed block."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    bi = bh // H
    hi = bh % H
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dmask = (dims < HEAD_DIM)[None, :]
    is_src = j < n_src
    sel = tl.load(SELECTED + bh * n_sel + tl.maximum(j - n_src, 0), mask=j >= n_src, other=0)
    blk = tl.where(is_src, j, n_src + sel)
    start, length = block_span(blk, n_src, L_src, N, BLOCK_SIZE)
    packed_start = tl.where(is_src, j * BLOCK_SIZE, L_src + (j - n_src) * BLOCK_SIZE)
    n_packed = L_src + n_sel * BLOCK_SIZE
    packed = (bh.to(tl.int64) * n_packed + packed_start + rows)[:, None] * HEAD_DIM + dims[None, :]
    in_slot = (rows < tl.where(is_src, length, BLOCK_SIZE))[:, None] & dmask
    k = load_rows(K, skb, skh, skn, bi, hi, start, length, BLOCK_M, BLOCK_D, HEAD_DIM)
    v = load_rows(V, svb, svh, svn, bi, hi, start, length, BLOCK_M, BLOCK_D, HEAD_DIM)
    tl.store(K_PACKED + packed, k, mask=in_slot)
    tl.store(V_PACKED + packed, v, mask=in_slot)


@triton.jit
def _unpack_kept_kernel(
    DK_PACKED, DV_PACKED, DK, DV, SELECTED, H, N, L_src, n_src, n_sel,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SEL: tl.constexpr,
):
    """Inverse of _pack_kept_kernel for gradients, into contiguous token-ordered DK, DV. One program
    per key block in token order: it writes every row of its block, zeros where the block was dropped,
    so the outputs need no zero fill first. SELECTED is sorted ascending (one comparison per entry
    finds a context block's slot)."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dmask = (dims < HEAD_DIM)[None, :]
    is_src = j < n_src
    slots = tl.arange(0, BLOCK_SEL)
    sel = tl.load(SELECTED + bh * n_sel + slots, mask=slots < n_sel, other=-1)
    hit = sel == (j - n_src)
    slot = tl.sum(tl.where(hit, slots, 0), 0)
    start, length = block_span(j, n_src, L_src, N, BLOCK_SIZE)
    # Rows to copy: the block's own rows if it was kept (a source block, or a selected context block).
    copied = tl.where(is_src | (tl.sum(hit.to(tl.int32), 0) > 0), length, 0)
    packed_start = tl.where(is_src, j * BLOCK_SIZE, L_src + slot * BLOCK_SIZE)
    n_packed = L_src + n_sel * BLOCK_SIZE
    packed = (bh.to(tl.int64) * n_packed + packed_start + rows)[:, None] * HEAD_DIM + dims[None, :]
    valid = (rows < length)[:, None] & dmask
    from_packed = (rows < copied)[:, None] & dmask
    tokens = (bh.to(tl.int64) * N + start + rows)[:, None] * HEAD_DIM + dims[None, :]
    tl.store(DK + tokens, tl.load(DK_PACKED + packed, mask=from_packed, other=0.0), mask=valid)
    tl.store(DV + tokens, tl.load(DV_PACKED + packed, mask=from_packed, other=0.0), mask=valid)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, O, LSE, DELTA, KP, VP, KEPT, QORDER, ELIST, EMASK, DQ,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sob, soh, son,
    H, N, L_src, n_src, nb, n_kv, n_full, n_exact, first_group, qk_scale, scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_P: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    g = first_group + tl.program_id(0)
    bh = tl.program_id(1)
    bi = bh // H
    hi = bh % H
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    pcols = tl.arange(0, BLOCK_P)
    qb = tl.load(QORDER + bh * nb + g)
    q_start, q_len = block_span(qb, n_src, L_src, N, BLOCK_SIZE)
    row_ok = rows < q_len
    q = load_rows(Q, sqb, sqh, sqn, bi, hi, q_start, q_len, BLOCK_M, BLOCK_D, HEAD_DIM)
    tok = bh.to(tl.int64) * N + q_start + rows
    do = load_rows(DO, sdb, sdh, sdn, bi, hi, q_start, q_len, BLOCK_M, BLOCK_D, HEAD_DIM)
    lse2 = tl.load(LSE + tok, mask=row_ok, other=0.0) * LOG2E
    # delta = rowsum(dout * out), here for every row the backward reads (the dk/dv and pooled
    # kernels run after this one and read it back): no fp32 copies of dout and out.
    o = load_rows(O, sob, soh, son, bi, hi, q_start, q_len, BLOCK_M, BLOCK_D, HEAD_DIM)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + tok, delta, mask=row_ok)

    is_exact = g < n_full
    n_blocks = tl.where(is_exact, n_kv, n_exact)
    n_chunks = tl.where(is_exact, 0, tl.cdiv(n_kv, BLOCK_P))
    list_base = ELIST + (bh.to(tl.int64) * nb + qb) * n_exact
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for e in range(n_blocks):
        listed = tl.load(list_base + tl.minimum(e, n_exact - 1))
        kidx = tl.where(is_exact, e, listed)
        kb = tl.load(KEPT + bh * n_kv + kidx)
        k_start, k_len = block_span(kb, n_src, L_src, N, BLOCK_SIZE)
        k = load_rows(K, skb, skh, skn, bi, hi, k_start, k_len, BLOCK_M, BLOCK_D, HEAD_DIM)
        v = load_rows(V, svb, svh, svn, bi, hi, k_start, k_len, BLOCK_M, BLOCK_D, HEAD_DIM)
        s = mma(q, tl.trans(k), UPCAST, IEEE) * qk_scale
        ok = row_ok[:, None] & (rows < k_len)[None, :]
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        dp = mma(do, tl.trans(v), UPCAST, IEEE)
        ds = p * (dp - delta[:, None])
        dq += mma(ds.to(k.dtype), k, UPCAST, IEEE)

    mask_base = EMASK + (bh.to(tl.int64) * nb + qb) * n_kv
    for c in range(n_chunks):
        pidx = c * BLOCK_P + pcols
        pvalid = pidx < n_kv
        kp = _load_pooled(KP, bh, pidx, n_kv, BLOCK_D, HEAD_DIM)
        vp = _load_pooled(VP, bh, pidx, n_kv, BLOCK_D, HEAD_DIM)
        kb = tl.load(KEPT + bh * n_kv + pidx, mask=pvalid, other=0)
        _, p_len = block_span(kb, n_src, L_src, N, BLOCK_SIZE)
        exact = tl.load(mask_base + pidx, mask=pvalid, other=1)
        s = mma(q, tl.trans(kp), UPCAST, IEEE) * qk_scale + tl.log2(p_len.to(tl.float32))[None, :]
        ok = row_ok[:, None] & (pvalid & (exact == 0))[None, :]
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        dp = mma(do, tl.trans(vp), UPCAST, IEEE)
        ds = p * (dp - delta[:, None])
        dq += mma(ds.to(kp.dtype), kp, UPCAST, IEEE)

    dq_ptrs = DQ + tok[:, None] * HEAD_DIM + dims[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (dims < HEAD_DIM)[None, :])


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, USERS, N_USERS, DK, DV,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    H, N, L_src, n_src, nb, qk_scale, scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """dk, dv of the tokens of one key block from every query block that attends to it exactly
    (zeros for a block nobody does, a dropped context block among them: dk, dv need no zero fill)."""
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    bi = bh // H
    hi = bh % H
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dmask = (dims < HEAD_DIM)[None, :]
    k_start, k_len = block_span(kb, n_src, L_src, N, BLOCK_SIZE)
    k_ok = rows < k_len
    n_users = tl.load(N_USERS + bh * nb + kb)
    k_read = tl.where(n_users > 0, k_len, 0)  # an unused block's keys are not read
    k = load_rows(K, skb, skh, skn, bi, hi, k_start, k_read, BLOCK_M, BLOCK_D, HEAD_DIM)
    v = load_rows(V, svb, svh, svn, bi, hi, k_start, k_read, BLOCK_M, BLOCK_D, HEAD_DIM)
    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    user_base = USERS + (bh.to(tl.int64) * nb + kb) * nb
    for u in range(n_users):
        qb = tl.load(user_base + u)
        q_start, q_len = block_span(qb, n_src, L_src, N, BLOCK_SIZE)
        q_ok = rows < q_len
        q = load_rows(Q, sqb, sqh, sqn, bi, hi, q_start, q_len, BLOCK_M, BLOCK_D, HEAD_DIM)
        tok = bh.to(tl.int64) * N + q_start + rows
        do = load_rows(DO, sdb, sdh, sdn, bi, hi, q_start, q_len, BLOCK_M, BLOCK_D, HEAD_DIM)
        lse2 = tl.load(LSE + tok, mask=q_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + tok, mask=q_ok, other=0.0)
        s_t = mma(k, tl.trans(q), UPCAST, IEEE) * qk_scale  # [keys, queries]
        ok = k_ok[:, None] & q_ok[None, :]
        p_t = tl.where(ok, tl.exp2(s_t - lse2[None, :]), 0.0)
        dv += mma(p_t.to(do.dtype), do, UPCAST, IEEE)
        dp_t = mma(v, tl.trans(do), UPCAST, IEEE)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += mma(ds_t.to(q.dtype), q, UPCAST, IEEE)
    out = (bh.to(tl.int64) * N + k_start + rows)[:, None] * HEAD_DIM + dims[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=k_ok[:, None] & dmask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=k_ok[:, None] & dmask)


@triton.jit
def _users_kernel(
    EMASK, EXACT_ROWS, KEPT, USERS, N_USERS, nb, n_kv, EXACT_IN_KERNEL: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """For BLOCK_J kept blocks of one (batch, head): the query blocks that attend to their tokens
    exactly in these kernels, ascending, at USERS[bh, key block, :count], and the count at N_USERS.

    A kept block's users are the flat query blocks whose exact mask marks it, and with
    EXACT_IN_KERNEL every exact-group block too (EXACT_ROWS: 1 for those).
    """
    jt = tl.program_id(0)
    bh = tl.program_id(1)
    js = jt * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = js < n_kv
    key_rows = bh.to(tl.int64) * nb + tl.load(KEPT + bh * n_kv + js, mask=j_ok, other=0)  # [BLOCK_J]
    count = tl.zeros([BLOCK_J], tl.int32)
    for q0 in range(0, nb, BLOCK_Q):
        qbs = q0 + tl.arange(0, BLOCK_Q)
        q_ok = qbs < nb
        exact = tl.load(EMASK + (bh.to(tl.int64) * nb + qbs[:, None]) * n_kv + js[None, :],
                        mask=q_ok[:, None] & j_ok[None, :], other=0) != 0
        group = tl.load(EXACT_ROWS + bh * nb + qbs, mask=q_ok, other=0)[:, None]
        if EXACT_IN_KERNEL:
            uses = exact | (group != 0)
        else:
            uses = exact & (group == 0)
        uses = (uses & j_ok[None, :]).to(tl.int32)  # [BLOCK_Q, BLOCK_J]
        position = count[None, :] + tl.cumsum(uses, axis=0) - 1
        tl.store(USERS + key_rows[None, :] * nb + position, qbs[:, None], mask=uses != 0)
        count += tl.sum(uses, axis=0)
    tl.store(N_USERS + key_rows, count, mask=j_ok)


@triton.jit
def _bwd_pooled_kernel(
    Q, DO, LSE, DELTA, KP, VP, KEPT, QORDER, EMASK, DKP, DVP,
    sqb, sqh, sqn, sdb, sdh, sdn,
    H, N, L_src, n_src, nb, n_kv, n_full, qk_scale, scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_P: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """Gradients of a chunk of pooled keys/values from every Taylor query block that uses them."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    bi = bh // H
    hi = bh % H
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dmask = (dims < HEAD_DIM)[None, :]
    pidx = c * BLOCK_P + tl.arange(0, BLOCK_P)
    pvalid = pidx < n_kv
    kp = _load_pooled(KP, bh, pidx, n_kv, BLOCK_D, HEAD_DIM)
    vp = _load_pooled(VP, bh, pidx, n_kv, BLOCK_D, HEAD_DIM)
    kb = tl.load(KEPT + bh * n_kv + pidx, mask=pvalid, other=0)
    _, p_len = block_span(kb, n_src, L_src, N, BLOCK_SIZE)
    log_len = tl.log2(p_len.to(tl.float32))
    dkp = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    dvp = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    for g in range(n_full, nb):
        qb = tl.load(QORDER + bh * nb + g)
        q_start, q_len = block_span(qb, n_src, L_src, N, BLOCK_SIZE)
        q_ok = rows < q_len
        q = load_rows(Q, sqb, sqh, sqn, bi, hi, q_start, q_len, BLOCK_M, BLOCK_D, HEAD_DIM)
        tok = bh.to(tl.int64) * N + q_start + rows
        do = load_rows(DO, sdb, sdh, sdn, bi, hi, q_start, q_len, BLOCK_M, BLOCK_D, HEAD_DIM)
        lse2 = tl.load(LSE + tok, mask=q_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + tok, mask=q_ok, other=0.0)
        exact = tl.load(EMASK + (bh.to(tl.int64) * nb + qb) * n_kv + pidx, mask=pvalid, other=1)
        s_t = mma(kp, tl.trans(q), UPCAST, IEEE) * qk_scale + log_len[:, None]  # [pooled, queries]
        ok = (pvalid & (exact == 0))[:, None] & q_ok[None, :]
        p_t = tl.where(ok, tl.exp2(s_t - lse2[None, :]), 0.0)
        dvp += mma(p_t.to(do.dtype), do, UPCAST, IEEE)
        dp_t = mma(vp, tl.trans(do), UPCAST, IEEE)
        ds_t = p_t * (dp_t - delta[None, :])
        dkp += mma(ds_t.to(q.dtype), q, UPCAST, IEEE)
    out = (bh.to(tl.int64) * n_kv + pidx)[:, None] * HEAD_DIM + dims[None, :]
    tl.store(DKP + out, dkp * scale, mask=pvalid[:, None] & dmask)
    tl.store(DVP + out, dvp, mask=pvalid[:, None] & dmask)


# ---------------------------------------------------------------------------------------------
# Host wrappers. Integer tables are int32 and contiguous, the exact mask uint8 and contiguous, pooled
# keys/values contiguous in the input dtype; each wrapper checks this at the boundary, since a kernel
# would silently misread any other layout. Outputs are contiguous [B, H, N, D].


def _expect(what: str, name: str, table: torch.Tensor, dtype: torch.dtype, shape: tuple, device) -> None:
    """One-line ValueError unless `table` has the dtype, shape, device and dense layout a kernel reads."""
    if not isinstance(table, torch.Tensor):
        raise ValueError(f"{what}: {name} must be a torch.Tensor, got {type(table).__name__}")
    if table.dtype != dtype:
        raise ValueError(f"{what}: {name} must be {dtype} (the kernels read it as such), got {table.dtype}")
    if tuple(table.shape) != tuple(shape):
        raise ValueError(f"{what}: {name} must have shape {tuple(shape)}, got {tuple(table.shape)}")
    if table.device != device:
        raise ValueError(f"{what}: {name} is on {table.device}, the inputs on {device}")
    if not table.is_contiguous():
        raise ValueError(f"{what}: {name} must be contiguous (the kernels index it as a dense array)")


def _check_plan(what, q, pooled_k, pooled_v, kept, query_order, exact_lists, exact_mask, num_source, block_size,
                num_full) -> tuple[int, int, int, int]:
    """Check the routing tables against q's shape; returns (n_src, nb, n_kv, n_exact)."""
    B, H, N, D = q.shape
    n_src, n_ctx = segment_blocks(num_source, N - num_source, block_size)
    nb = n_src + n_ctx
    n_kv = kept.shape[-1] if isinstance(kept, torch.Tensor) else -1
    n_exact = exact_lists.shape[-1] if isinstance(exact_lists, torch.Tensor) else -1
    if not n_src <= n_kv <= nb:
        raise ValueError(f"{what}: kept must list between {n_src} and {nb} key blocks, got {n_kv}")
    if not 1 <= n_exact <= n_kv:
        raise ValueError(f"{what}: exact_lists must hold between 1 and {n_kv} blocks per query block, got {n_exact}")
    if not 0 <= num_full <= nb:
        raise ValueError(f"{what}: num_full must be in [0, {nb}], got {num_full}")
    _expect(what, "kept", kept, torch.int32, (B, H, n_kv), q.device)
    _expect(what, "query_order", query_order, torch.int32, (B, H, nb), q.device)
    _expect(what, "exact_lists", exact_lists, torch.int32, (B, H, nb, n_exact), q.device)
    _expect(what, "exact_mask", exact_mask, torch.uint8, (B, H, nb, n_kv), q.device)
    _expect(what, "pooled_k", pooled_k, q.dtype, (B, H, n_kv, D), q.device)
    _expect(what, "pooled_v", pooled_v, q.dtype, (B, H, n_kv, D), q.device)
    return n_src, nb, n_kv, n_exact


def _check_query_order(what, query_order, B, H, N, num_source, block_size, num_full, device) -> tuple[int, int]:
    """Check the query order table; returns (n_src, nb)."""
    n_src, n_ctx = segment_blocks(num_source, N - num_source, block_size)
    nb = n_src + n_ctx
    _expect(what, "query_order", query_order, torch.int32, (B, H, nb), device)
    if not 0 <= num_full <= nb:
        raise ValueError(f"{what}: num_full must be in [0, {nb}], got {num_full}")
    return n_src, nb


def _check_selected(what, selected, B, H, N, num_source, block_size, device) -> tuple[int, int]:
    """Check the selected context blocks; returns (n_src, n_sel)."""
    n_src, n_ctx = segment_blocks(num_source, N - num_source, block_size)
    n_sel = selected.shape[-1] if isinstance(selected, torch.Tensor) else -1
    if not 0 <= n_sel <= n_ctx:
        raise ValueError(f"{what}: selected must list between 0 and {n_ctx} context blocks, got {n_sel}")
    _expect(what, "selected", selected, torch.int32, (B, H, n_sel), device)
    return n_src, n_sel


def _meta(q: torch.Tensor, block_size: int) -> dict:
    return dict(
        BLOCK_SIZE=block_size,
        BLOCK_M=tile_rows(block_size),
        BLOCK_D=tile_dims(q.shape[-1]),
        HEAD_DIM=q.shape[-1],
        UPCAST=INTERPRET,
        IEEE=q.dtype == torch.float32,
    )


def _launch_options(block_size: int, head_dim: int, kernel: str) -> dict:
    """num_warps / num_stages of `kernel` ("forward", "dq", "dkdv" or "pooled") for these tiles."""
    rows, dims = tile_rows(block_size), tile_dims(head_dim)
    if rows * dims <= 16 * 64:
        # A 16 x 64 query or key tile is one warp's work: more programs per SM. The pooled-key kernel's
        # tile is 64 pooled keys whatever the block. benchmarks/bench_isa_launch.py, one H200, the tiny
        # model's training shape (docs/benchmarks.md): forward 1.58 -> 0.97 ms, dq 1.40 -> 1.12,
        # dk/dv 0.96 -> 0.53 against four warps, pooled 0.30 with three stages against 0.39 with two.
        if kernel == "pooled":
            return dict(num_warps=4, num_stages=3)
        return dict(num_warps=1, num_stages=3 if kernel == "dkdv" else 1)
    # 64-row tiles: one warpgroup; wider tiles need two. Backward holds two accumulators: shallower pipeline.
    wide = rows * dims > 64 * 128
    return dict(num_warps=8 if wide else 4, num_stages=2 if kernel != "forward" or wide else 3)


@on_input_device
def sparse_forward(q, k, v, pooled_k, pooled_v, kept, query_order, exact_lists, exact_mask, exact_out,
                   num_source: int, block_size: int, num_full: int, scale: float, stages=("scatter", "attend")):
    """Forward of both groups; returns (out [B,H,N,D] in q's dtype, lse [B,H,N] fp32), both contiguous.

    exact_out: the exact group computed by a dense kernel, packed `[B, H, num_full*b, D]` in
    query_order, or None to compute the exact group here. `stages` lets a benchmark time the
    scatter of exact_out and the attention launch one at a time.
    """
    B, H, N, D = q.shape
    n_src, nb, n_kv, n_exact = _check_plan("sparse_forward", q, pooled_k, pooled_v, kept, query_order, exact_lists,
                                          exact_mask, num_source, block_size, num_full)
    if exact_out is not None:
        exact_out = exact_out.contiguous()
        _expect("sparse_forward", "exact_out", exact_out, q.dtype, (B, H, num_full * block_size, D), q.device)
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    out = torch.empty(B, H, N, D, device=q.device, dtype=q.dtype)
    # With exact_out no kernel here writes the exact group's lse (its backward is the dense kernel's):
    # zeros there rather than uninitialised memory, so that the output is deterministic.
    lse = (torch.empty if exact_out is None else torch.zeros)(B, H, N, device=q.device, dtype=torch.float32)
    meta = _meta(q, block_size)
    first = 0
    if exact_out is not None:
        first = num_full
    if exact_out is not None and "scatter" in stages:
        _move_rows_kernel[(num_full, B * H)](
            exact_out, out, query_order, *out.stride()[:3], H, N, num_source, n_src, nb, num_full,
            TO_TOKENS=True, BLOCK_SIZE=block_size, BLOCK_M=meta["BLOCK_M"], BLOCK_D=meta["BLOCK_D"], HEAD_DIM=D,
        )
    if nb > first and "attend" in stages:
        _fwd_kernel[(nb - first, B * H)](
            q, k, v, pooled_k, pooled_v, kept, query_order, exact_lists, exact_mask, out, lse,
            *leading_strides(q, k, v),
            H, N, num_source, n_src, nb, n_kv, num_full, n_exact, first, scale * LOG2E.value,
            BLOCK_P=POOLED_CHUNK, **meta, **_launch_options(block_size, D, "forward"),
        )
    return out, lse


@on_input_device
def gather_exact_rows(x: torch.Tensor, query_order: torch.Tensor, num_source: int, block_size: int, num_full: int):
    """Token-ordered `[B,H,N,D]` -> packed exact-group rows `[B,H,num_full*b,D]`, padding rows zero."""
    B, H, N, D = x.shape
    n_src, nb = _check_query_order("gather_exact_rows", query_order, B, H, N, num_source, block_size, num_full,
                                   x.device)
    x = last_dim_contiguous(x)
    packed = torch.empty(B, H, num_full * block_size, D, device=x.device, dtype=x.dtype)
    meta = _meta(x, block_size)
    _move_rows_kernel[(num_full, B * H)](
        x, packed, query_order, *x.stride()[:3], H, N, num_source, n_src, nb, num_full, TO_TOKENS=False,
        BLOCK_SIZE=block_size, BLOCK_M=meta["BLOCK_M"], BLOCK_D=meta["BLOCK_D"], HEAD_DIM=D,
    )
    return packed


@on_input_device
def scatter_exact_rows(packed: torch.Tensor, query_order: torch.Tensor, num_source: int, block_size: int,
                       num_tokens: int):
    """Inverse of gather_exact_rows: `[B,H,N,D]` holding the packed rows at their tokens, zeros elsewhere."""
    B, H, _, D = packed.shape
    num_full = packed.shape[2] // block_size
    n_src, nb = _check_query_order("scatter_exact_rows", query_order, B, H, num_tokens, num_source, block_size,
                                   num_full, packed.device)
    out = torch.empty(B, H, num_tokens, D, device=packed.device, dtype=packed.dtype)
    meta = _meta(packed, block_size)
    _move_rows_kernel[(nb, B * H)](  # every query block: the Taylor group's tokens get zeros, no fill first
        packed.contiguous(), out, query_order, *out.stride()[:3], H, num_tokens, num_source, n_src, nb, num_full,
        TO_TOKENS=True, BLOCK_SIZE=block_size, BLOCK_M=meta["BLOCK_M"], BLOCK_D=meta["BLOCK_D"], HEAD_DIM=D,
    )
    return out


@on_input_device
def pack_kept(k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor, num_source: int, block_size: int):
    """Kept keys and values packed for a dense kernel: `[B, H, L_src + n_sel*b, D]` each."""
    B, H, N, D = k.shape
    n_src, n_sel = _check_selected("pack_kept", selected, B, H, N, num_source, block_size, k.device)
    k, v = last_dim_contiguous(k), last_dim_contiguous(v)
    k_packed = torch.empty(B, H, num_source + n_sel * block_size, D, device=k.device, dtype=k.dtype)
    v_packed = torch.empty_like(k_packed)
    meta = _meta(k, block_size)
    _pack_kept_kernel[(n_src + n_sel, B * H)](
        k, v, k_packed, v_packed, selected, *leading_strides(k, v), H, N, num_source, n_src, n_sel,
        BLOCK_SIZE=block_size, BLOCK_M=meta["BLOCK_M"], BLOCK_D=meta["BLOCK_D"], HEAD_DIM=D,
    )
    return k_packed, v_packed


@on_input_device
def unpack_kept(dk_packed: torch.Tensor, dv_packed: torch.Tensor, selected: torch.Tensor, num_source: int,
                block_size: int, num_tokens: int):
    """Inverse of pack_kept for gradients: token-ordered tensors, zero on the dropped context blocks
    (written by the kernel: no zero fill first). `selected` sorted ascending, as plan_isa makes it."""
    B, H, _, D = dk_packed.shape
    n_src, n_sel = _check_selected("unpack_kept", selected, B, H, num_tokens, num_source, block_size,
                                   dk_packed.device)
    _, n_ctx = segment_blocks(num_source, num_tokens - num_source, block_size)
    dk = torch.empty(B, H, num_tokens, D, device=dk_packed.device, dtype=dk_packed.dtype)
    dv = torch.empty_like(dk)
    meta = _meta(dk, block_size)
    _unpack_kept_kernel[(n_src + n_ctx, B * H)](
        dk_packed.contiguous(), dv_packed.contiguous(), dk, dv, selected, H, num_tokens, num_source, n_src, n_sel,
        BLOCK_SIZE=block_size, BLOCK_M=meta["BLOCK_M"], BLOCK_D=meta["BLOCK_D"], HEAD_DIM=D,
        BLOCK_SEL=max(16, triton.next_power_of_2(n_sel)),
    )
    return dk, dv


USERS_TILE = (64, 32)  # (query blocks, kept blocks) per step of the users kernel


@on_input_device
def exact_users(exact_mask: torch.Tensor, query_order: torch.Tensor, kept: torch.Tensor, num_full: int,
                exact_in_kernel: bool):
    """For every key block, the query blocks that attend to its tokens exactly in these kernels.

    Returns (users [B,H,nb,nb] int32 by key block id, first n_users entries valid (ascending), the
    rest unset; n_users [B,H,nb] int32, 0 for a dropped context block).
    """
    B, H, nb, n_kv = exact_mask.shape
    exact_rows = torch.zeros(B, H, nb, dtype=torch.uint8, device=exact_mask.device)
    exact_rows.scatter_(-1, query_order[..., :num_full].long(), 1)
    users = torch.empty(B, H, nb, nb, dtype=torch.int32, device=exact_mask.device)
    n_users = torch.zeros(B, H, nb, dtype=torch.int32, device=exact_mask.device)  # dropped blocks stay 0
    block_q, block_j = USERS_TILE
    _users_kernel[(triton.cdiv(n_kv, block_j), B * H)](
        exact_mask, exact_rows, kept, users, n_users, nb, n_kv, EXACT_IN_KERNEL=exact_in_kernel,
        BLOCK_Q=block_q, BLOCK_J=block_j,
    )
    return users, n_users


@on_input_device
def sparse_backward(dout, q, k, v, pooled_k, pooled_v, kept, query_order, exact_lists, exact_mask, out, lse,
                    exact_from_dense: bool, num_source: int, block_size: int, num_full: int, scale: float):
    """Gradients of sparse_forward's `out`: (dq, dk, dv, d pooled_k fp32, d pooled_v fp32).

    With exact_from_dense, the exact group's rows of dq/dk/dv are left to the dense kernel's backward.
    """
    B, H, N, D = q.shape
    n_src, nb, n_kv, n_exact = _check_plan("sparse_backward", q, pooled_k, pooled_v, kept, query_order, exact_lists,
                                          exact_mask, num_source, block_size, num_full)
    _expect("sparse_backward", "lse", lse, torch.float32, (B, H, N), q.device)
    q, k, v, dout, out = (last_dim_contiguous(x) for x in (q, k, v, dout, out))
    meta = _meta(q, block_size)
    delta = torch.empty(B, H, N, device=q.device, dtype=torch.float32)  # written by the dq kernel
    # No zero fills where a kernel writes: the dq kernel writes the Taylor group's rows and, unless the
    # dense kernel's backward gives them, the exact group's; the dk/dv kernel writes every key block.
    # Only the pooled gradients are filled, when no Taylor block exists.
    dq = torch.empty(B, H, N, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, H, N, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, H, N, D, device=q.device, dtype=v.dtype)
    pooled_fill = torch.empty if nb > num_full else torch.zeros
    dpk, dpv = (pooled_fill(B, H, n_kv, D, device=q.device, dtype=torch.float32) for _ in range(2))
    first = num_full if exact_from_dense else 0
    qk_scale = scale * LOG2E.value
    if first:  # the exact group's dq rows are zero here: the move kernel with no packed rows writes zeros
        _move_rows_kernel[(first, B * H)](
            dq, dq, query_order, *dq.stride()[:3], H, N, num_source, n_src, nb, 0, TO_TOKENS=True,
            BLOCK_SIZE=block_size, BLOCK_M=meta["BLOCK_M"], BLOCK_D=meta["BLOCK_D"], HEAD_DIM=D,
        )
    if nb > first:
        _bwd_dq_kernel[(nb - first, B * H)](
            q, k, v, dout, out, lse, delta, pooled_k, pooled_v, kept, query_order, exact_lists, exact_mask, dq,
            *leading_strides(q, k, v, dout, out),
            H, N, num_source, n_src, nb, n_kv, num_full, n_exact, first, qk_scale, scale,
            BLOCK_P=POOLED_CHUNK, **meta, **_launch_options(block_size, D, "dq"),
        )
    users, n_users = exact_users(exact_mask, query_order, kept, num_full, not exact_from_dense)
    _bwd_dkdv_kernel[(nb, B * H)](
        q, k, v, dout, lse, delta, users, n_users, dk, dv,
        *leading_strides(q, k, v, dout),
        H, N, num_source, n_src, nb, qk_scale, scale,
        **meta, **_launch_options(block_size, D, "dkdv"),
    )
    if nb > num_full:
        _bwd_pooled_kernel[(triton.cdiv(n_kv, POOLED_CHUNK), B * H)](
            q, dout, lse, delta, pooled_k, pooled_v, kept, query_order, exact_mask, dpk, dpv,
            *leading_strides(q, dout),
            H, N, num_source, n_src, nb, n_kv, num_full, qk_scale, scale,
            BLOCK_P=POOLED_CHUNK, **meta, **_launch_options(block_size, D, "pooled"),
        )
    return dq, dk, dv, dpk, dpv
