"""Self-attention processor of LIVEditor: ISA or dense attention over the `[source | context]` sequence.

It plugs into diffusers' `WanAttention` (the module of every Wan transformer block) in place of
`WanAttnProcessor`, so the projections, qk-norm and output projection stay diffusers' own. Only the
attention itself changes: ISA (`liveditor.isa.isa_attention`, with the layer's coarse-residual
gate) or dense softmax attention through diffusers' attention dispatcher.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..isa import ISAConfig, isa_attention

ATTENTION_MODES = ("isa", "dense")


@dataclass(frozen=True)
class InContextLayout:
    """What one forward pass tells every self-attention layer about its sequence.

    num_source: tokens of the noisy source segment (first in the sequence); the rest is context.
    grid: (frames, rows, cols) of one segment in tokens; source and context share it.
    """

    num_source: int
    grid: tuple[int, int, int]


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


def apply_rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of `x` [B, N, H, D] by Wan's RoPE tables [1, N, 1, D]."""
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos = cos[..., 0::2]
    sin = sin[..., 1::2]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


class LIVEditorAttnProcessor:
    """Self-attention of one LIVEditor block.

    mode "isa": In-context Sparse Attention with the coarse residual gated by the layer's
    `attn.coarse_gate` (a `Linear(dim, 1, bias=False)`), so that pruned context still reaches the
    output. mode "dense": full softmax attention over the whole sequence, no coarse residual.

    The model sets `layout` (an InContextLayout) before every forward pass and shares one
    AttentionTimer between all layers.
    """

    _attention_backend = None  # diffusers' attention dispatcher backend for the dense path
    _parallel_config = None

    def __init__(self, mode: str = "isa", isa_config: ISAConfig | None = None, timer: AttentionTimer | None = None):
        self.set_mode(mode, isa_config)
        self.timer = timer if timer is not None else AttentionTimer()
        self.layout: InContextLayout | None = None

    def set_mode(self, mode: str, isa_config: ISAConfig | None = None) -> None:
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
        if isa_config is not None and not isinstance(isa_config, ISAConfig):
            raise ValueError(f"isa_config must be an ISAConfig, got {type(isa_config).__name__}")
        self.mode = mode
        self.isa_config = isa_config if isa_config is not None else ISAConfig()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("LIVEditorAttnProcessor is for self-attention without a mask")
        layout = self.layout
        if layout is None:
            raise ValueError("LIVEditorAttnProcessor needs the model to set its in-context layout first")

        query, key, value = self_attention_qkv(attn, hidden_states, rotary_emb)

        with self.timer.measure(query.device):
            if self.mode == "isa":
                gate = coarse_gate_value(attn.coarse_gate(hidden_states)).to(query.dtype)
                out = isa_attention(
                    query.transpose(1, 2),
                    key.transpose(1, 2),
                    value.transpose(1, 2),
                    layout.num_source,
                    self.isa_config,
                    gate=gate,
                    grid=layout.grid,
                ).transpose(1, 2)
            else:
                out = _dense_attention(query, key, value, self._attention_backend)

        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def self_attention_qkv(attn, hidden_states: torch.Tensor, rotary_emb) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, N, H, D]`` of a Wan self-attention module: projections, qk RMSNorm, RoPE."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        query = apply_rotary_embedding(query, *rotary_emb)
        key = apply_rotary_embedding(key, *rotary_emb)
    return query, key, value


def _dense_attention(query, key, value, backend) -> torch.Tensor:
    """Full attention on [B, N, H, D] through diffusers' dispatcher (SDPA unless a backend is set)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, backend=backend)
