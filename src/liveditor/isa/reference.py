"""ISA in plain PyTorch: the executable form of docs/isa-semantics.md.

Runs on any device and float dtype and is differentiable. The Taylor path is computed through the
augmented-key identity: a flat query block attends with one softmax over the tokens of its exact
key blocks plus one pooled key per other kept block (logit bias log(block length)). Query blocks
are processed in chunks so that no N x N matrix is ever formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import BlockCounts, ISAConfig, ISAInfo, block_counts
from .layout import BlockLayout, block_layout, block_means, decision_dtype, expand_blocks

# Upper bound on the logits held at once per chunk (elements), about 256 MB in fp32.
_CHUNK_ELEMENTS = 1 << 26

# Up to this many per row, the largest entries are found by repeated argmax: torch.topk's CUDA kernel
# took 0.66 ms a call for a training step's exact-key choice (6 of 96 over [256, 4, 128, 96], one H200),
# while each argmax pass is one reduction over the row for torch.compile to fuse with the masking; the
# compiled training step's top-k kernels (5.1 ms) are gone since (docs/benchmarks.md, 4db6ae3).
ARGMAX_TOP_LIMIT = 8


def top_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k largest entries of each row (last dim) of finite x, largest first; up to
    ARGMAX_TOP_LIMIT by repeated argmax (ties to the first position, on every device), else torch.topk."""
    if k > ARGMAX_TOP_LIMIT:
        return x.topk(k, dim=-1).indices
    positions = torch.arange(x.shape[-1], device=x.device)
    chosen = []
    for _ in range(k):
        index = x.argmax(-1, keepdim=True)
        chosen.append(index)
        x = torch.where(positions == index, float("-inf"), x)
    return torch.cat(chosen, dim=-1)


def _as_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """[B, H, N, D] as blocks [B, H, nb, b, D]: a view when the blocks are whole, else a gather."""
    if layout.whole_blocks:
        return x.unflatten(2, tuple(layout.token_index.shape))
    return x[:, :, layout.token_index]


def coarse_decisions(qc, kc, scale: float, counts: BlockCounts, config: ISAConfig):
    """Coarse map, context pre-selection, sharpness routing and Taylor exact-block choice.

    Returns (coarse logits S, coarse probs P, kept key blocks [B,H,n_kv], selected context blocks
    [B,H,n_sel], exact query mask [B,H,nb], exact-key-block mask [B,H,nb,n_kv] and the same blocks
    listed [B,H,nb,n_exact] (positions in kept, largest coarse logit first); both None for joint
    blocking, which chooses exact key blocks on the re-blocked kept tokens).
    """
    n_src = counts.num_source_blocks
    logits = (qc @ kc.transpose(-1, -2)) * scale
    probs = torch.softmax(logits, dim=-1)
    B, H, nb, _ = probs.shape
    src_blocks = torch.arange(n_src, device=qc.device).expand(B, H, n_src)
    if counts.num_context_blocks:
        context_score = probs[:, :, :n_src, n_src:].sum(-2)
        selected = context_score.topk(counts.num_selected, dim=-1).indices.sort(dim=-1).values
        kept = torch.cat([src_blocks, selected + n_src], dim=-1)
    else:
        selected = torch.zeros(B, H, 0, dtype=torch.long, device=qc.device)
        kept = src_blocks

    row = probs[..., :n_src]
    if config.sharpness == "energy":
        sharpness = (row * row).sum(-1)
    else:
        sharpness = row.topk(counts.topk_sharpness, dim=-1).values.sum(-1)
    exact_query = torch.zeros(B, H, nb, dtype=torch.bool, device=qc.device)
    exact_query.scatter_(-1, sharpness.topk(counts.num_full, dim=-1).indices, True)
    if config.blocking == "joint":
        return logits, probs, kept, selected, exact_query, None, None

    kept_logits = logits.gather(-1, kept[:, :, None, :].expand(B, H, nb, kept.shape[-1]))
    exact_key_list = top_indices(kept_logits, counts.num_exact)
    exact_key = torch.zeros_like(kept_logits, dtype=torch.bool)
    exact_key.scatter_(-1, exact_key_list, True)
    return logits, probs, kept, selected, exact_query, exact_key, exact_key_list


def _softmax_attend(logits, values, pooled_logits=None, pooled_values=None):
    """Softmax over [token logits | pooled logits] (fp32), then the weighted sum of values.

    logits [B, H, c, q, T] with values [B, H, c, T, D] (or [B, H, 1, T, D], shared by the chunk's c
    query blocks); pooled logits [B, H, c, q, n] with pooled values [B, H, n, D], always shared.
    """
    if pooled_logits is not None:
        logits = torch.cat([logits, pooled_logits], dim=-1)
    probs = torch.softmax(logits, dim=-1).to(values.dtype)
    n_tokens = values.shape[-2]
    out = probs[..., :n_tokens] @ values
    if pooled_logits is not None:
        # One product over all the chunk's queries: broadcasting the shared pooled values against
        # [B, H, c, ...] would copy them once per query block.
        out = out + (probs[..., n_tokens:].flatten(2, 3) @ pooled_values).view_as(out)
    return out


# Attention logits are formed in fp32 (fp64 for fp64 inputs) from the input-dtype q and k, as the
# kernels' fp32 accumulation does: fp16 logits would overflow where |q.k| > 65504 although the
# scaled logits (and SDPA) are fine, and would round every logit to fp16.


def _exact_chunk(q_chunk, keys, values, key_valid, scale):
    """Exact group: query blocks [B,H,c,b,D] over all kept tokens [B,H,T,D] (keys in the logit dtype,
    valid [B,H,T], None when every slot holds a token)."""
    B, H, c, b, D = q_chunk.shape
    queries = q_chunk.reshape(B, H, c * b, D).to(keys.dtype)
    if values.dtype == keys.dtype:
        # fp32/fp64 inputs: the probabilities need no rounding before the product, so SDPA computes
        # the same function in one fused call (faster on a CPU: docs/benchmarks.md, CPU edit time).
        mask = None if key_valid is None else key_valid[:, :, None, :]
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale).reshape(B, H, c, b, D)
    logits = (queries @ keys.transpose(-1, -2)) * scale
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, :, None, :], float("-inf"))
    return _softmax_attend(logits, values).reshape(B, H, c, b, D)


def _taylor_chunk(q_chunk, keys, values, key_valid, pooled_keys, pooled_values, pooled_bias, scale):
    """Taylor group: each query block over its own exact tokens [B,H,c,T,D] (valid [B,H,c,T]) plus
    the pooled keys [B,H,n_kv,D] of the other kept blocks (pooled_bias [B,H,c,n_kv], -inf for the
    exact ones): exact attention over the augmented key set. Keys come in the logit dtype; valid is
    None when every slot holds a token."""
    q_chunk = q_chunk.to(keys.dtype)
    logits = (q_chunk @ keys.transpose(-1, -2)) * scale
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, :, :, None, :], float("-inf"))
    pooled_logits = torch.einsum("bhcqd,bhkd->bhcqk", q_chunk, pooled_keys) * scale
    pooled_logits = pooled_logits + pooled_bias[:, :, :, None, :]
    return _softmax_attend(logits, values, pooled_logits, pooled_values)


def _gather_blocks(x, pos, b: int):
    """Blocks `pos` [B,H,m] of a blocked sequence x [B,H,n*b,F] as [B,H,m*b,F]: whole rows of
    b*F elements copied by index_select, several times faster on a CPU than a per-element gather."""
    B, H, length, features = x.shape
    n = length // b
    base = torch.arange(B * H, device=pos.device).view(B, H, 1) * n
    rows = x.reshape(B * H * n, b * features).index_select(0, (base + pos).flatten())
    return rows.view(B, H, -1, features)


def _in_chunks(fn, n: int, per_item: int, use_checkpoint: bool, *args):
    """Run fn(start, stop, *args) over [0, n) in chunks of at most _CHUNK_ELEMENTS elements."""
    chunk = max(1, min(n, _CHUNK_ELEMENTS // max(per_item, 1)))
    outputs = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        if use_checkpoint and chunk < n:
            outputs.append(checkpoint(fn, start, stop, *args, use_reentrant=False))
        else:
            outputs.append(fn(start, stop, *args))
    return torch.cat(outputs, dim=2)


def flop_fraction(layout, counts, kept, exact_query, exact_key, n_tokens, has_gate) -> float:
    """Multiply-add FLOPs actually spent over dense attention's, averaged over batch and heads."""
    q_len = layout.block_length.double()  # [nb]
    kept_len = q_len[kept]  # [B, H, n_kv]
    exact_cost = (q_len * kept_len.sum(-1, keepdim=True)) * exact_query  # [B, H, nb]
    taylor_keys = (exact_key * kept_len[:, :, None, :]).sum(-1) + (counts.num_kept - counts.num_exact)
    taylor_cost = (q_len * taylor_keys) * ~exact_query
    nb = counts.num_blocks
    coarse = nb * nb * (2 if has_gate else 1) * 0.5  # Qc Kc^T (and P Vc): half of a QK+PV pair
    per_head = (exact_cost + taylor_cost).sum(-1) + coarse
    return float((per_head / (n_tokens * n_tokens)).mean())


def isa_attention_torch(q, k, v, num_source: int, config: ISAConfig, gate=None, scale: float = 1.0, return_info=False):
    """ISA on already-validated `[B, H, N, D]` inputs (see liveditor.isa.isa_attention)."""
    if config.blocking == "joint":
        return _isa_attention_joint(q, k, v, num_source, config, gate, scale, return_info)
    B, H, N, D = q.shape
    num_context = N - num_source
    b = config.block_size
    counts = block_counts(num_source, num_context, config)
    layout = block_layout(num_source, num_context, b, q.device)
    nb, n_kv = counts.num_blocks, counts.num_kept

    # Views when the blocks are whole; with partial blocks, one gather each, shared by every use below.
    q_blocks, k_blocks, v_blocks = (_as_blocks(x, layout) for x in (q, k, v))  # [B, H, nb, b, D]
    qc, kc, vc = (block_means(x, num_source, b) for x in (q, k, v))
    logits, probs, kept, selected, exact_query, exact_key, _ = coarse_decisions(qc, kc, scale, counts, config)

    # Kept key set: all source blocks plus the selected context blocks, as padded slots.
    padded = not layout.whole_blocks  # some blocks hold fewer than b tokens
    logit_dtype = decision_dtype(q.dtype)
    keys, values = (_gather_blocks(x.flatten(2, 3), kept, b) for x in (k_blocks, v_blocks))
    keys = keys.to(logit_dtype)
    key_valid = layout.slot_valid[kept].flatten(2) if padded else None  # [B, H, n_kv*b]
    kept_length = layout.block_length[kept].to(logit_dtype)
    kept_index = kept[..., None].expand(B, H, n_kv, D)
    # Pooled keys as the kernels read them: the fp32 mean rounded to the input dtype.
    pooled_keys = kc.gather(2, kept_index).to(q.dtype).to(logit_dtype)
    pooled_values = vc.gather(2, kept_index).to(v.dtype)

    # Route: query blocks ordered [Taylor group | exact group] (same sizes for every head).
    order = torch.argsort(exact_query.to(torch.int8), dim=-1, stable=True)  # [B, H, nb]
    n_taylor = nb - counts.num_full
    routed = _gather_blocks(q_blocks.flatten(2, 3), order, b).unflatten(2, (nb, b))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))

    def exact_group(start, stop, q_exact):
        return _exact_chunk(q_exact[:, :, start:stop], keys, values, key_valid, scale)

    out_exact = _in_chunks(exact_group, counts.num_full, H * B * b * n_kv * b, grad, routed[:, :, n_taylor:])

    if n_taylor:
        taylor_blocks = order[..., :n_taylor]  # [B, H, n_t]
        exact_choice = exact_key.gather(2, taylor_blocks[..., None].expand(B, H, n_taylor, n_kv))
        # The exact key blocks of each Taylor query block, as positions in the kept set.
        exact_pos = exact_choice.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., : counts.num_exact]
        pooled_bias = torch.where(exact_choice, float("-inf"), kept_length.log()[:, :, None, :])
        kept_slots_valid = layout.slot_valid[kept] if padded else None  # [B, H, n_kv, b]

        def taylor_group(start, stop, q_taylor):
            pos = exact_pos[:, :, start:stop].flatten(2)  # [B, H, c * n_exact]: blocks of the kept set
            c = stop - start
            chunk_keys = _gather_blocks(keys, pos, b).reshape(B, H, c, -1, D)
            chunk_values = _gather_blocks(values, pos, b).reshape(B, H, c, -1, D)
            valid = None if kept_slots_valid is None else _gather_blocks(kept_slots_valid.flatten(2)[..., None], pos, b)
            return _taylor_chunk(q_taylor[:, :, start:stop], chunk_keys, chunk_values,
                                 None if valid is None else valid.reshape(B, H, c, -1),
                                 pooled_keys, pooled_values, pooled_bias[:, :, start:stop], scale)

        per_block = H * B * b * (counts.num_exact * b * (1 + 2 * D // b) + n_kv)
        out_taylor = _in_chunks(taylor_group, n_taylor, per_block, grad, routed[:, :, :n_taylor])
        out_routed = torch.cat([out_taylor, out_exact], dim=2)
    else:
        out_routed = out_exact
    inverse = torch.argsort(order, dim=-1)
    out_blocks = _gather_blocks(out_routed.flatten(2, 3), inverse, b).unflatten(2, (nb, b))
    if gate is not None:
        # The coarse residual per block, broadcast over the block's slots.
        coarse_out = (probs @ vc)[:, :, :, None, :]  # [B, H, nb, 1, D]
        gate = _as_blocks(gate.reshape(B, 1, N, 1), layout).to(coarse_out.dtype)  # [B, 1, nb, b, 1]
        out_blocks = (out_blocks.to(coarse_out.dtype) + gate * coarse_out).to(q.dtype)
    out = out_blocks.flatten(2, 3)
    if padded:
        out = out[:, :, layout.token_slot]  # [B, H, N, D]

    if not return_info:
        return out
    info = ISAInfo(
        selected_context_blocks=selected,
        exact_query_blocks=exact_query,
        num_source_blocks=counts.num_source_blocks,
        num_context_blocks=counts.num_context_blocks,
        flop_fraction=flop_fraction(layout, counts, kept, exact_query, exact_key, N, gate is not None),
    )
    return out, info


def _isa_attention_joint(q, k, v, num_source: int, config: ISAConfig, gate, scale: float, return_info: bool):
    """ISA with the released code's joint blocking, emulated to measure its difference from ours.

    The concatenated sequence is cut into blocks from its start (the last one partial, pooled over
    its real tokens). Kept keys: every source token, then the block_size slots of each selected
    block of the zero-padded sequence (a selected straddling block repeats the source tail, a
    selected last block brings zero keys, logit 0). A Taylor query block re-blocks those kept keys
    from their start (zero-padded to whole blocks), pools each re-block over all block_size slots,
    takes the top num_exact by pooled-query . pooled-key and enters the others with bias
    log(block_size). Every logit over the kept keys is formed and masked: for measurement, not speed.
    """
    B, H, N, D = q.shape
    b = config.block_size
    if num_source < b:
        raise ValueError(f'blocking="joint" needs at least one whole source block ({b} tokens), got {num_source}')
    counts = block_counts(num_source, N - num_source, config)
    layout = block_layout(N, 0, b, q.device)  # blocks of [source | context] from its start
    nb = counts.num_blocks
    dtype = decision_dtype(q.dtype)
    qc, kc, vc = (block_means(x, N, b) for x in (q, k, v))  # one segment: blocks from the start
    _, probs, _, selected, exact_query, _, _ = coarse_decisions(qc, kc, scale, counts, config)

    pad = nb * b - N
    k_pad, v_pad = (F.pad(x.to(dtype), (0, 0, 0, pad)) for x in (k, v))
    context_slots = (selected + counts.num_source_blocks)[..., None] * b + torch.arange(b, device=q.device)
    source_slots = torch.arange(num_source, device=q.device).expand(B, H, num_source)
    kept_slots = torch.cat([source_slots, context_slots.flatten(2)], dim=-1)  # [B, H, T]
    n_kept = kept_slots.shape[-1]
    n_reblocks = -(-n_kept // b)
    reblock_pad = n_reblocks * b - n_kept
    keys, values = (F.pad(x.gather(2, kept_slots[..., None].expand(B, H, n_kept, D)), (0, 0, 0, reblock_pad))
                    for x in (k_pad, v_pad))  # [B, H, n_reblocks * b, D]
    pooled_keys, pooled_values = (x.unflatten(2, (n_reblocks, b)).mean(-2) for x in (keys, values))

    exact_reblocks = top_indices(qc @ pooled_keys.transpose(-1, -2), counts.num_exact)
    exact_key = torch.zeros(B, H, nb, n_reblocks, dtype=torch.bool, device=q.device)
    exact_key.scatter_(-1, exact_reblocks, True)
    exact_key |= exact_query[..., None]  # an exact query block attends to every kept key
    token_valid = exact_key.repeat_interleave(b, dim=-1)
    token_valid[..., n_kept:] &= ~exact_query[..., None]  # the re-blocking pad exists only for Taylor blocks
    pooled_bias = torch.where(exact_key, float("-inf"), torch.tensor(float(b), dtype=dtype).log())

    q_blocks = F.pad(q.to(dtype), (0, 0, 0, pad)).unflatten(2, (nb, b))  # [B, H, nb, b, D]

    def query_blocks(start, stop):
        qb = q_blocks[:, :, start:stop]
        logits = (qb @ keys[:, :, None].transpose(-1, -2)) * scale
        logits = logits.masked_fill(~token_valid[:, :, start:stop, None, :], float("-inf"))
        pooled_logits = (qb @ pooled_keys[:, :, None].transpose(-1, -2)) * scale
        pooled_logits = pooled_logits + pooled_bias[:, :, start:stop, None, :]
        return _softmax_attend(logits, values[:, :, None], pooled_logits, pooled_values)

    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    out = _in_chunks(query_blocks, nb, B * H * b * (n_reblocks * b + n_reblocks), grad)
    out = out.flatten(2, 3)[:, :, :N]
    if gate is not None:
        out = out + gate.reshape(B, 1, N, 1).to(dtype) * expand_blocks(probs @ vc, N, N, b)
    out = out.to(q.dtype)
    if not return_info:
        return out
    q_len = layout.block_length.double()
    taylor_keys = float(counts.num_exact * b + n_reblocks - counts.num_exact)
    per_block = torch.where(exact_query, float(n_kept), taylor_keys) * q_len
    coarse = nb * nb * (2 if gate is not None else 1) * 0.5
    info = ISAInfo(
        selected_context_blocks=selected,
        exact_query_blocks=exact_query,
        num_source_blocks=counts.num_source_blocks,
        num_context_blocks=counts.num_context_blocks,
        flop_fraction=float(((per_block.sum(-1) + coarse) / (N * N)).mean()),
    )
    return out, info
