"""Attention processors of LIVEditor: self-attention (ISA or dense over the `[source | context]`
sequence) and text cross-attention.

They plug into diffusers' `WanAttention` (the module of every Wan transformer block) in place of
`WanAttnProcessor`, so the projections, qk-norm and output projection stay diffusers' own. Only the
attention itself changes: ISA (`liveditor.isa.isa_attention`, with the layer's coarse-residual
gate) or dense softmax attention through diffusers' attention dispatcher for self-attention, and
`liveditor.isa.few_key_attention` (Triton kernels for a short prompt on CUDA, else SDPA) for
cross-attention.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..isa import ISAConfig, ISAInfo, coarse_residual, few_key_attention, isa_attention
from .sequence_parallel import SequenceShard

ATTENTION_MODES = ("isa", "dense")


@dataclass(frozen=True)
class AttentionEvent:
    """What one self-attention call saw and decided, handed to `SelfAttentionCall.callback`.

    query, key, value: `[B, H, N, D]` as attention received them (after projections, qk-norm and
    RoPE; under sequence parallelism the rank's heads over all N tokens); gate: the
    coarse-residual gate `[B, N]`; `info`: the ISAInfo of the call in "isa" mode,
    None in "dense" mode.
    """

    layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    gate: torch.Tensor
    num_source: int
    grid: tuple[int, int, int]
    mode: str
    info: ISAInfo | None


@dataclass(frozen=True)
class SelfAttentionCall:
    """Everything one self-attention call needs; the model builds it for each forward pass and it
    travels with the call, so processors hold no state and gradient checkpointing recomputes a block
    with exactly the call of its forward.

    num_source: tokens of the noisy source segment (first in the sequence); the rest is context.
    grid: (frames, rows, cols) of one segment in tokens; source and context share it.
    mode: "isa" or "dense" (exact attention plus the same gated coarse residual).
    isa_config: ISA's knobs; in "dense" mode only block_size and token_order (the residual's blocks).
    callback: optional, called once per layer with an AttentionEvent (ISA decisions, q/k/v).
    timer: optional AttentionTimer that accumulates time spent in attention.
    sequence_shard: under Ulysses sequence parallelism, this rank's SequenceShard: the processor
        receives the rank's token shard and attends over all tokens on its share of the heads.
    """

    num_source: int
    grid: tuple[int, int, int]
    mode: str = "isa"
    isa_config: ISAConfig = field(default_factory=ISAConfig)
    callback: Callable[[AttentionEvent], None] | None = None
    timer: "AttentionTimer | None" = None
    sequence_shard: SequenceShard | None = None

    def __post_init__(self):
        if self.mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {self.mode!r}")
        if not isinstance(self.isa_config, ISAConfig):
            raise ValueError(f"isa_config must be an ISAConfig, got {type(self.isa_config).__name__}")
        if self.callback is not None and not callable(self.callback):
            raise ValueError(f"callback must be callable, got {type(self.callback).__name__}")


class AttentionTimer:
    """Wall-clock time spent inside attention kernels, for "share of time in attention" reports.

    Disabled by default because timing GPU work needs a device synchronisation around each call.
    """

    def __init__(self):
        self.enabled = False
        self.seconds = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    @contextmanager
    def measure(self, device: torch.device):
        if not self.enabled:
            yield
            return
        _synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize(device)
            self.seconds += time.perf_counter() - start
            self.calls += 1


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def coarse_gate_value(gate_logit: torch.Tensor) -> torch.Tensor:
    """The released model's per-token residual gate: (sigmoid(alpha_1(x)) - 0.5) * 0.5, in (-0.25, 0.25)."""
    return (torch.sigmoid(gate_logit.float()) - 0.5) * 0.5


def apply_rotary_embedding(cos: torch.Tensor, sin: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rotate interleaved channel pairs of each of `tensors` [B, N, H, D] by Wan's RoPE tables
    [1, N, 1, D] (each pair's angle repeated over its two channels): (even, odd) -> (even cos - odd sin,
    odd cos + even sin). Returns the rotated tensors in order.

    Written as x * cos + swap(x) * (-sin, sin) rather than de-interleaving and stacking, which
    torch.compile turned into masked, strided loads (the slowest kernel of a training step's forward);
    the signed sine table is built once for all the tensors (q and k of a layer).
    """
    signs = torch.arange(cos.shape[-1], device=cos.device) % 2 * 2 - 1  # -1, 1, -1, ...: no host-to-device copy
    signed_sin = sin * signs
    rotated = []
    for x in tensors:
        x32 = x.float()
        swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (odd, even) in each pair
        rotated.append((x32 * cos + swapped * signed_sin).type_as(x))
    return tuple(rotated)


class LIVEditorAttnProcessor:
    """Self-attention of one LIVEditor block; stateless, like diffusers' `WanAttnProcessor`.

    Everything a call needs arrives with it as a `SelfAttentionCall` (`call=`), plus the block's
    `layer` index for callbacks. mode "isa": In-context Sparse Attention with the coarse residual
    gated by the layer's `attn.coarse_gate` (a `Linear(dim, 1, bias=False)`, gate
    `(sigmoid(.) - 0.5) * 0.5`). mode "dense": exact attention over the whole sequence plus the same
    gated coarse residual: the function a LIVEditor model was trained to compute, without sparsity.
    """

    _attention_backend = None  # diffusers' attention dispatcher backend for the dense path
    _parallel_config = None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        call: SelfAttentionCall | None = None,
        layer: int = -1,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("LIVEditorAttnProcessor is for self-attention without a mask")
        if not isinstance(call, SelfAttentionCall):
            raise ValueError("LIVEditorAttnProcessor needs call=SelfAttentionCall(...) (the model passes it)")

        query, key, value = self_attention_qkv(attn, hidden_states, rotary_emb)
        gate = coarse_gate_value(attn.coarse_gate(hidden_states)).to(query.dtype)
        shard = call.sequence_shard
        if shard is not None:  # local tokens, all heads -> all tokens, the rank's heads
            query, key, value = (shard.tokens_to_heads(x) for x in (query, key, value))
            gate = shard.gather(gate)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        info = None
        timing = call.timer.measure(query.device) if call.timer is not None else nullcontext()
        with timing:
            if call.mode == "isa":
                result = isa_attention(
                    q, k, v, call.num_source, call.isa_config, gate=gate, grid=call.grid,
                    return_info=call.callback is not None,
                )
                out, info = result if call.callback is not None else (result, None)
                out = out.transpose(1, 2)
            else:
                out = _dense_attention(query, key, value, self._attention_backend)
                residual = coarse_residual(q, k, v, call.num_source, gate, call.isa_config, grid=call.grid)
                out = out + residual.transpose(1, 2).to(out.dtype)
        if call.callback is not None:
            call.callback(AttentionEvent(layer, q, k, v, gate.squeeze(-1), call.num_source, call.grid, call.mode, info))

        if shard is not None:
            out = shard.heads_to_tokens(out)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class LIVEditorCrossAttnProcessor:
    """Text cross-attention of one LIVEditor block; stateless. The function of diffusers'
    `WanAttnProcessor` for text-only cross-attention (projections, qk RMSNorm, softmax attention over
    the prompt's tokens, output projection), with the attention through `few_key_attention`: on CUDA
    with a short prompt (the tiny model's: at most 32 tokens) Triton kernels, 2.5x less device time
    than SDPA in a training step's forward + backward; otherwise SDPA, as before. A diffusers
    attention backend set on the model (`set_attention_backend`) is honoured through diffusers'
    dispatcher instead.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or attention_mask is not None or rotary_emb is not None:
            raise ValueError("LIVEditorCrossAttnProcessor is for text cross-attention without a mask or RoPE")
        if attn.add_k_proj is not None:
            raise ValueError("LIVEditorCrossAttnProcessor has no image-conditioning branch (add_k_proj)")
        query = attn.to_q(hidden_states)
        if getattr(attn, "fused_projections", False):
            key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        else:
            key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = normed_heads(attn, query, key, value)
        if self._attention_backend is None:
            out = few_key_attention(query, key, value)
        else:
            out = _dense_attention(query, key, value, self._attention_backend)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def normed_heads(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Projected `[B, tokens, H*D]` q, k, v of a Wan attention module as `[B, tokens, H, D]`, q and k
    through its RMSNorm across heads (Wan's qk-norm)."""
    heads = (attn.heads, -1)
    return attn.norm_q(query).unflatten(2, heads), attn.norm_k(key).unflatten(2, heads), value.unflatten(2, heads)


def self_attention_qkv(attn, hidden_states: torch.Tensor, rotary_emb) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, N, H, D]`` of a Wan self-attention module: projections, qk RMSNorm, RoPE."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query, key, value = normed_heads(attn, query, key, value)
    if rotary_emb is not None:
        query, key = apply_rotary_embedding(*rotary_emb, query, key)
    return query, key, value


def _dense_attention(query, key, value, backend) -> torch.Tensor:
    """Full attention on [B, N, H, D] through diffusers' dispatcher (SDPA unless a backend is set)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, backend=backend)
