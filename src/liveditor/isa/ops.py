"""ISA on the GPU: Triton kernels as torch custom ops (fake impls, autograd) and the operator built on them.

The operator (`isa_attention_triton`) runs the same stages as the PyTorch path and takes the same
decisions (it calls `reference.coarse_decisions` on the pooled tensors):

1. fp32 block means of q, k, v (`layout.block_means`: torch ops; compiled, their backward is a
   broadcast).
2. Coarse logits, softmax, context ranking, sharpness routing and each flat block's exact key
   blocks: torch ops on the device (top-k stays on the GPU, no host sync).
3. Exact group: a dense kernel (see `dense_kernels`: measured or pinned, FlashAttention-3 if
   installed, SDPA cuDNN / flash / efficient) over the sharp query blocks and the kept keys,
   packed by a Triton kernel; or the Triton attention kernel itself, by default when the kept keys
   carry padding (the context's last block is partial), so that no key mask is needed.
4. `liveditor::isa_sparse_attention`: the Taylor group and the scatter of the exact group into
   token order, one kernel launch each (Triton).
5. Optional coarse residual (torch ops).

Every step is traceable by torch.compile without graph breaks: the Triton launches sit behind
custom ops with fake implementations, everything else is aten ops with static shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import ISAConfig, ISAInfo, block_counts, segment_blocks
from .dense_kernels import choose_dense_kernel, dense_exact_attention
from .layout import block_layout, block_means, expand_blocks
from .reference import coarse_decisions, flop_fraction
from .triton_common import input_unsupported_reason
from .triton_sparse import (
    gather_exact_rows,
    pack_kept,
    scatter_exact_rows,
    sparse_backward,
    sparse_forward,
    unpack_kept,
)


def block_spans(blocks: torch.Tensor, num_source: int, n_tokens: int, block_size: int):
    """First token and true length of each block id in `blocks` (same shape and dtype)."""
    n_src, _ = segment_blocks(num_source, n_tokens - num_source, block_size)
    is_src = blocks < n_src
    start = torch.where(is_src, blocks * block_size, num_source + (blocks - n_src) * block_size)
    limit = torch.where(is_src, torch.full_like(blocks, num_source), torch.full_like(blocks, n_tokens))
    return start, torch.minimum(start + block_size, limit) - start


# ------------------------------------------------------------------------- sparse attention op


@torch.library.custom_op("liveditor::isa_sparse_attention", mutates_args=())
def isa_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pooled_k: torch.Tensor, pooled_v: torch.Tensor,
    kept: torch.Tensor, query_order: torch.Tensor, exact_lists: torch.Tensor, exact_mask: torch.Tensor,
    exact_out: Optional[torch.Tensor], num_source: int, block_size: int, num_full: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return sparse_forward(q, k, v, pooled_k, pooled_v, kept, query_order, exact_lists, exact_mask, exact_out,
                          num_source, block_size, num_full, scale)


@isa_sparse_attention.register_fake
def _isa_sparse_attention_fake(q, k, v, pooled_k, pooled_v, kept, query_order, exact_lists, exact_mask, exact_out,
                               num_source, block_size, num_full, scale):
    B, H, N, D = q.shape
    return q.new_empty(B, H, N, D), q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("liveditor::isa_sparse_attention_backward", mutates_args=())
def isa_sparse_attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pooled_k: torch.Tensor,
    pooled_v: torch.Tensor, kept: torch.Tensor, query_order: torch.Tensor, exact_lists: torch.Tensor,
    exact_mask: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, exact_from_dense: bool, num_source: int,
    block_size: int, num_full: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return sparse_backward(dout, q, k, v, pooled_k, pooled_v, kept, query_order, exact_lists, exact_mask, out, lse,
                           exact_from_dense, num_source, block_size, num_full, scale)


@isa_sparse_attention_backward.register_fake
def _isa_sparse_attention_backward_fake(dout, q, k, v, pooled_k, pooled_v, kept, query_order, exact_lists,
                                        exact_mask, out, lse, exact_from_dense, num_source, block_size, num_full,
                                        scale):
    # new_empty, not empty_like: the gradients are fresh contiguous tensors whatever q/k/v's strides
    # (the model passes transposed views), and inductor checks the real strides against these.
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            pooled_k.new_empty(pooled_k.shape, dtype=torch.float32),
            pooled_v.new_empty(pooled_v.shape, dtype=torch.float32))


@torch.library.custom_op("liveditor::isa_gather_exact_rows", mutates_args=())
def isa_gather_exact_rows(x: torch.Tensor, query_order: torch.Tensor, num_source: int, block_size: int,
                          num_full: int) -> torch.Tensor:
    return gather_exact_rows(x, query_order, num_source, block_size, num_full)


@isa_gather_exact_rows.register_fake
def _isa_gather_exact_rows_fake(x, query_order, num_source, block_size, num_full):
    B, H, _, D = x.shape
    return x.new_empty(B, H, num_full * block_size, D)


def _sparse_setup(ctx, inputs, output):
    (q, k, v, pooled_k, pooled_v, kept, query_order, exact_lists, exact_mask, exact_out,
     num_source, block_size, num_full, scale) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, pooled_k, pooled_v, kept, query_order, exact_lists, exact_mask, out, lse)
    ctx.exact_from_dense = exact_out is not None
    ctx.args = (num_source, block_size, num_full, scale)


def _sparse_backward(ctx, dout, dlse):
    q, k, v, pooled_k, pooled_v, kept, query_order, exact_lists, exact_mask, out, lse = ctx.saved_tensors
    num_source, block_size, num_full, scale = ctx.args
    dq, dk, dv, dpk, dpv = isa_sparse_attention_backward(
        dout, q, k, v, pooled_k, pooled_v, kept, query_order, exact_lists, exact_mask, out, lse,
        ctx.exact_from_dense, num_source, block_size, num_full, scale,
    )
    d_exact = None
    if ctx.exact_from_dense:
        d_exact = isa_gather_exact_rows(dout, query_order, num_source, block_size, num_full)
    return (dq, dk, dv, dpk.to(pooled_k.dtype), dpv.to(pooled_v.dtype), None, None, None, None, d_exact,
            None, None, None, None)


isa_sparse_attention.register_autograd(_sparse_backward, setup_context=_sparse_setup)


@torch.library.custom_op("liveditor::isa_pack_exact", mutates_args=())
def isa_pack_exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_order: torch.Tensor,
                   selected: torch.Tensor, num_source: int, block_size: int, num_full: int) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor
]:
    """The exact group's inputs for a dense kernel: sharp query blocks and kept keys/values, packed."""
    q_ex = gather_exact_rows(q, query_order, num_source, block_size, num_full)
    k_ex, v_ex = pack_kept(k, v, selected, num_source, block_size)
    return q_ex, k_ex, v_ex


@isa_pack_exact.register_fake
def _isa_pack_exact_fake(q, k, v, query_order, selected, num_source, block_size, num_full):
    B, H, _, D = q.shape
    kv_len = num_source + selected.shape[-1] * block_size
    return q.new_empty(B, H, num_full * block_size, D), k.new_empty(B, H, kv_len, D), v.new_empty(B, H, kv_len, D)


@torch.library.custom_op("liveditor::isa_unpack_exact", mutates_args=())
def isa_unpack_exact(dq_ex: torch.Tensor, dk_ex: torch.Tensor, dv_ex: torch.Tensor, query_order: torch.Tensor,
                     selected: torch.Tensor, num_source: int, block_size: int, num_tokens: int) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor
]:
    dq = scatter_exact_rows(dq_ex, query_order, num_source, block_size, num_tokens)
    dk, dv = unpack_kept(dk_ex, dv_ex, selected, num_source, block_size, num_tokens)
    return dq, dk, dv


@isa_unpack_exact.register_fake
def _isa_unpack_exact_fake(dq_ex, dk_ex, dv_ex, query_order, selected, num_source, block_size, num_tokens):
    B, H, _, D = dq_ex.shape
    return tuple(x.new_empty(B, H, num_tokens, D) for x in (dq_ex, dk_ex, dv_ex))


def _pack_setup(ctx, inputs, output):
    q, k, v, query_order, selected, num_source, block_size, num_full = inputs
    ctx.save_for_backward(query_order, selected)
    ctx.args = (num_source, block_size, q.shape[2])


def _pack_backward(ctx, dq_ex, dk_ex, dv_ex):
    query_order, selected = ctx.saved_tensors
    num_source, block_size, num_tokens = ctx.args
    dq, dk, dv = isa_unpack_exact(dq_ex.contiguous(), dk_ex.contiguous(), dv_ex.contiguous(), query_order, selected,
                                  num_source, block_size, num_tokens)
    return dq, dk, dv, None, None, None, None, None


isa_pack_exact.register_autograd(_pack_backward, setup_context=_pack_setup)


# ------------------------------------------------------------------------------ the operator


def triton_unsupported_reason(q: torch.Tensor, config: ISAConfig) -> str | None:
    """Why the Triton kernels cannot run these inputs, or None when they can (this module imports
    Triton: dispatch reports a missing one when importing it)."""
    reason = input_unsupported_reason(q)
    if reason is not None:
        return reason
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} is over 256"
    if config.block_size > 128:
        return f"block_size {config.block_size} is over 128"
    if config.blocking != "separate":
        return f'blocking="{config.blocking}" (the release\'s, emulated for measurement) runs in the PyTorch path only'
    return None


def exact_group_dense(q, k, v, query_order, selected, num_source: int, block_size: int, num_full: int,
                      scale: float, kernel: str):
    """The exact group through dense kernel `kernel`: packed `[B, H, num_full*b, D]` in query_order.

    query_order, selected: int32 tables from plan_isa (`query_order`, `selected32`).
    """
    B, H, N, D = q.shape
    b = block_size
    q_ex, k_ex, v_ex = isa_pack_exact(q, k, v, query_order, selected, num_source, b, num_full)
    mask = None
    if (N - num_source) % b:  # the last context block is partial: its padding slots must not count
        n_src, _ = segment_blocks(num_source, N - num_source, b)
        _, ctx_len = block_spans(selected + n_src, num_source, N, b)
        ctx_valid = (torch.arange(b, device=q.device) < ctx_len[..., None]).flatten(2)
        src_valid = torch.ones(B, H, num_source, dtype=torch.bool, device=q.device)
        mask = torch.cat([src_valid, ctx_valid], dim=2)[:, :, None, :]
    return dense_exact_attention(kernel, q_ex, k_ex, v_ex, mask, scale)


@dataclass
class ISAPlan:
    """ISA's decisions for one call, in the forms the kernels read."""

    probs: torch.Tensor  # [B, H, nb, nb] fp32 coarse map (for the gated residual)
    vc: torch.Tensor  # [B, H, nb, D] fp32 pooled values
    kept: torch.Tensor  # [B, H, n_kv] long kept key blocks
    kept32: torch.Tensor  # the same, int32
    selected: torch.Tensor  # [B, H, n_sel] long selected context blocks
    selected32: torch.Tensor  # the same, int32
    exact_query: torch.Tensor  # [B, H, nb] bool
    exact_key: torch.Tensor  # [B, H, nb, n_kv] bool
    query_order: torch.Tensor  # [B, H, nb] int32: exact-group blocks first, then Taylor blocks
    exact_mask: torch.Tensor  # [B, H, nb, n_kv] uint8
    exact_lists: torch.Tensor  # [B, H, nb, n_exact] int32 indices into kept
    pooled_k: torch.Tensor  # [B, H, n_kv, D] pooled keys of the kept blocks, input dtype
    pooled_v: torch.Tensor


def plan_isa(q, k, v, num_source: int, config: ISAConfig, scale: float) -> ISAPlan:
    """Pooling, coarse map and all routing decisions (torch ops on the device)."""
    B, H, N, D = q.shape
    counts = block_counts(num_source, N - num_source, config)
    qc, kc, vc = (block_means(x, num_source, config.block_size) for x in (q, k, v))
    _, probs, kept, selected, exact_query, exact_key, exact_key_list = coarse_decisions(qc, kc, scale, counts,
                                                                                        config)
    query_order = torch.sort(exact_query.to(torch.uint8), dim=-1, descending=True, stable=True).indices
    exact_mask = exact_key.to(torch.uint8).contiguous()
    exact_lists = exact_key_list.to(torch.int32).contiguous()  # the kernels' order: largest coarse logit first
    kept_index = kept[..., None].expand(B, H, counts.num_kept, D)
    return ISAPlan(
        probs=probs, vc=vc, kept=kept, kept32=kept.to(torch.int32).contiguous(), selected=selected,
        selected32=selected.to(torch.int32).contiguous(),
        exact_query=exact_query, exact_key=exact_key,
        query_order=query_order.to(torch.int32).contiguous(), exact_mask=exact_mask, exact_lists=exact_lists,
        pooled_k=kc.gather(2, kept_index).to(q.dtype), pooled_v=vc.gather(2, kept_index).to(v.dtype),
    )


def isa_attention_triton(q, k, v, num_source: int, config: ISAConfig, gate=None, scale: float = 1.0,
                         return_info: bool = False, dense_kernel: str | None = None):
    """ISA on already-validated `[B, H, N, D]` inputs with the Triton kernels (see isa_attention).

    dense_kernel: the exact group's kernel, one of dense_kernels.DENSE_KERNEL_SETTINGS; None (the
    default) follows the process setting (set_dense_kernel / LIVEDITOR_ISA_DENSE_KERNEL / "auto").
    """
    B, H, N, D = q.shape
    b = config.block_size
    num_context = N - num_source
    counts = block_counts(num_source, num_context, config)
    n_full = counts.num_full

    plan = plan_isa(q, k, v, num_source, config, scale)
    kernel = choose_dense_kernel(q, masked=num_context % b != 0, setting=dense_kernel)
    exact_out = None
    if kernel != "triton":
        exact_out = exact_group_dense(q, k, v, plan.query_order, plan.selected32, num_source, b, n_full, scale,
                                      kernel)
    out, _ = isa_sparse_attention(q, k, v, plan.pooled_k, plan.pooled_v, plan.kept32, plan.query_order,
                                  plan.exact_lists, plan.exact_mask, exact_out, num_source, b, n_full, float(scale))

    if gate is not None:
        coarse_out = expand_blocks(plan.probs @ plan.vc, num_source, N, b)
        out = (out.to(coarse_out.dtype) + gate.reshape(B, 1, N, 1).to(coarse_out.dtype) * coarse_out).to(q.dtype)

    if not return_info:
        return out

    layout = block_layout(num_source, num_context, b, q.device)
    info = ISAInfo(
        selected_context_blocks=plan.selected,
        exact_query_blocks=plan.exact_query,
        num_source_blocks=counts.num_source_blocks,
        num_context_blocks=counts.num_context_blocks,
        flop_fraction=flop_fraction(layout, counts, plan.kept, plan.exact_query, plan.exact_key, N, gate is not None),
    )
    return out, info
