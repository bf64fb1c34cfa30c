"""ISA in plain PyTorch: the executable form of docs/isa-semantics.md.

Runs on any device and float dtype and is differentiable. The Taylor path is computed through the
augmented-key identity: a flat query block attends with one softmax over the tokens of its exact
key blocks plus one pooled key per other kept block (logit bias log(block length)). Query blocks
are processed in chunks so that no N x N matrix is ever formed.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .config import BlockCounts, ISAConfig, ISAInfo, block_counts
from .layout import BlockLayout, block_layout

# Upper bound on the logits held at once per chunk (elements), about 256 MB in fp32.
_CHUNK_ELEMENTS = 1 << 26


def decision_dtype(dtype: torch.dtype) -> torch.dtype:
    """Pooling and routing run in fp32 at least (fp64 stays fp64, for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def pool_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Mean of each block's real tokens: [B, H, N, D] -> [B, H, nb, D] in the decision dtype."""
    xb = x[:, :, layout.token_index].to(decision_dtype(x.dtype))  # [B, H, nb, b, D]
    weight = layout.slot_valid.to(xb.dtype)[:, :, None]
    return (xb * weight).sum(-2) / layout.block_length.to(xb.dtype)[:, None]


def coarse_decisions(qc, kc, scale: float, counts: BlockCounts, config: ISAConfig):
    """Coarse map, context pre-selection, sharpness routing and Taylor exact-block choice.

    Returns (coarse logits S, coarse probs P, kept key blocks [B,H,n_kv], selected context blocks
    [B,H,n_sel], exact query mask [B,H,nb], exact-key-block mask [B,H,nb,n_kv]).
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

    kept_logits = logits.gather(-1, kept[:, :, None, :].expand(B, H, nb, kept.shape[-1]))
    exact_key = torch.zeros_like(kept_logits, dtype=torch.bool)
    exact_key.scatter_(-1, kept_logits.topk(counts.num_exact, dim=-1).indices, True)
    return logits, probs, kept, selected, exact_query, exact_key


def _attend_chunk(q_chunk, keys, values, pooled_keys, pooled_values, token_allowed, pooled_bias, scale):
    """Softmax attention of query blocks over [kept tokens | pooled keys] with block-level masks.

    q_chunk [B,H,c,b,D]; keys/values [B,H,T,D]; pooled_keys/values [B,H,n_kv,D];
    token_allowed [B,H,c,T] bool; pooled_bias [B,H,c,n_kv] float (-inf where not used).
    """
    softmax_dtype = decision_dtype(q_chunk.dtype)
    token_logits = torch.einsum("bhcqd,bhtd->bhcqt", q_chunk, keys).to(softmax_dtype) * scale
    token_logits = token_logits.masked_fill(~token_allowed[:, :, :, None, :], float("-inf"))
    pooled_logits = torch.einsum("bhcqd,bhkd->bhcqk", q_chunk, pooled_keys).to(softmax_dtype) * scale
    pooled_logits = pooled_logits + pooled_bias[:, :, :, None, :]
    probs = torch.softmax(torch.cat([token_logits, pooled_logits], dim=-1), dim=-1).to(values.dtype)
    n_tokens = keys.shape[2]
    return torch.einsum("bhcqt,bhtd->bhcqd", probs[..., :n_tokens], values) + torch.einsum(
        "bhcqk,bhkd->bhcqd", probs[..., n_tokens:], pooled_values
    )


def _flop_fraction(layout, counts, kept, exact_query, exact_key, n_tokens, has_gate) -> float:
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
    B, H, N, D = q.shape
    num_context = N - num_source
    b = config.block_size
    counts = block_counts(num_source, num_context, config)
    layout = block_layout(num_source, num_context, b, q.device)
    nb, n_kv = counts.num_blocks, counts.num_kept

    qc, kc, vc = (pool_blocks(x, layout) for x in (q, k, v))
    logits, probs, kept, selected, exact_query, exact_key = coarse_decisions(qc, kc, scale, counts, config)

    # Kept key set: all source blocks plus the selected context blocks, as padded slots.
    kept_slots = layout.token_index[kept]  # [B, H, n_kv, b]
    gather_index = kept_slots.flatten(2)[..., None].expand(B, H, n_kv * b, D)
    keys = k.gather(2, gather_index)
    values = v.gather(2, gather_index)
    key_valid = layout.slot_valid[kept].flatten(2)  # [B, H, n_kv*b]
    kept_length = layout.block_length[kept].to(decision_dtype(q.dtype))
    kept_index = kept[..., None].expand(B, H, n_kv, D)
    pooled_keys = kc.gather(2, kept_index).to(q.dtype)
    pooled_values = vc.gather(2, kept_index).to(v.dtype)

    # Per query block: which kept tokens it sees exactly, and which pooled keys it uses.
    token_block_allowed = exact_query[..., None] | exact_key  # [B, H, nb, n_kv]
    pooled_bias = torch.where(
        token_block_allowed, torch.tensor(float("-inf"), device=q.device), kept_length.log()[:, :, None, :]
    )

    q_blocks = q[:, :, layout.token_index]  # [B, H, nb, b, D]
    per_block = H * B * b * (n_kv * b + n_kv)
    chunk = max(1, min(nb, _CHUNK_ELEMENTS // max(per_block, 1)))
    use_checkpoint = torch.is_grad_enabled() and chunk < nb and any(t.requires_grad for t in (q, k, v))
    outputs = []
    for start in range(0, nb, chunk):
        stop = min(nb, start + chunk)
        token_allowed = token_block_allowed[:, :, start:stop, :, None].expand(-1, -1, -1, -1, b).flatten(3)
        token_allowed = token_allowed & key_valid[:, :, None, :]
        args = (q_blocks[:, :, start:stop], keys, values, pooled_keys, pooled_values, token_allowed,
                pooled_bias[:, :, start:stop], scale)
        if use_checkpoint:
            outputs.append(checkpoint(_attend_chunk, *args, use_reentrant=False))
        else:
            outputs.append(_attend_chunk(*args))
    out = torch.cat(outputs, dim=2).flatten(2, 3)[:, :, layout.token_slot]  # [B, H, N, D]

    if gate is not None:
        coarse_out = (probs @ vc)[:, :, layout.token_block]  # [B, H, N, D]
        gate = gate.reshape(B, 1, N, 1).to(coarse_out.dtype)
        out = (out.to(coarse_out.dtype) + gate * coarse_out).to(q.dtype)

    if not return_info:
        return out
    info = ISAInfo(
        selected_context_blocks=selected,
        exact_query_blocks=exact_query,
        num_source_blocks=counts.num_source_blocks,
        num_context_blocks=counts.num_context_blocks,
        flop_fraction=_flop_fraction(layout, counts, kept, exact_query, exact_key, N, gate is not None),
    )
    return out, info
