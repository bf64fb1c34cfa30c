"""LIVEditorTransformer3DModel: Wan's video DiT turned into an in-context editor.

Built from diffusers' Wan building blocks (patch embedding, time/text embedder, 3D RoPE,
`WanTransformerBlock`, output head). What LIVEditor adds:

- a second patch embedding (`context_embedding`) for the clean latent of the input video;
- one self-attention sequence `[source | context]` per block (source = the noisy latent being
  generated); cross-attention to the text computes Wan's function (its processor,
  `LIVEditorCrossAttnProcessor`, runs short prompts through Triton kernels on CUDA);
- decoupled 3D RoPE: the context restarts at position 0 on the same (f, h, w) grid as the source;
- a per-layer coarse-residual gate `attn1.coarse_gate = Linear(dim, 1, bias=False)`;
- self-attention through the stateless `LIVEditorAttnProcessor` ("isa" or "dense", switchable at
  run time); each forward builds one `SelfAttentionCall` (layout, mode, ISA config, callback) that
  every block passes on to its processor;
- only the source tokens are decoded by the head.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict
from typing import Any

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import (
    WanRotaryPosEmbed,
    WanTimeTextImageEmbedding,
    WanTransformerBlock,
)

from ..isa import ISAConfig
from .attention_processor import (
    ATTENTION_MODES,
    AttentionTimer,
    LIVEditorAttnProcessor,
    LIVEditorCrossAttnProcessor,
    SelfAttentionCall,
)
from .sequence_parallel import SequenceShard

# ISA as the released LIVEditor-14B runs it: top-k sharpness, block counts rounded down (int()).
# Blocking stays ours (source and context padded separately): docs/model.md, parity table.
RELEASE_ISA_CONFIG: dict[str, Any] = dict(sharpness="topk", count_rounding="floor")

# Architecture presets. "liveditor-14b" is the high-noise expert of Wan2.2-T2V-A14B (spec section 3);
# the small ones keep every mechanism (RoPE split, qk-norm, gate) at sizes a CPU runs in seconds.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "liveditor-14b": dict(
        patch_size=(1, 2, 2),
        num_attention_heads=40,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=13824,
        num_layers=40,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
        isa_config=RELEASE_ISA_CONFIG,
    ),
    "liveditor-small": dict(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=16,
        out_channels=16,
        text_dim=64,
        freq_dim=64,
        ffn_dim=256,
        num_layers=4,
    ),
    "liveditor-tiny": dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
    ),
}


# Angular frequencies (times pi/2) of the absolute position features; on coordinates in [-1, 1] the
# highest has a period of half the axis, i.e. 2 tokens on an 8-token axis.
POSITION_FREQUENCIES = (1, 2, 4, 8)


@functools.lru_cache(maxsize=16)
def grid_position_features(grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """float32 ``[F*H*W, 3 * (1 + 2 * len(POSITION_FREQUENCIES))]`` features of each token's
    (frame, row, column), raster order: per axis the coordinate of the token's centre in [-1, 1] and
    sin/cos of it at POSITION_FREQUENCIES * pi / 2. Built once per grid and device (every forward
    needs them; callers must not modify the shared tensor)."""
    with torch.inference_mode(False):  # a tensor first built under inference mode could not train
        frequencies = torch.tensor(POSITION_FREQUENCIES, device=device, dtype=torch.float32) * (math.pi / 2)
        axes = []
        for n in grid:
            centre = (2 * torch.arange(n, device=device, dtype=torch.float32) + 1) / n - 1
            angles = centre[:, None] * frequencies
            axes.append(torch.cat([centre[:, None], angles.sin(), angles.cos()], dim=1))
        (f, h, w), (frames, rows, columns), d = grid, axes, axes[0].shape[1]
        return torch.cat([
            frames[:, None, None, :].expand(-1, h, w, d),
            rows[None, :, None, :].expand(f, -1, w, d),
            columns[None, None, :, :].expand(f, h, -1, d),
        ], dim=-1).reshape(f * h * w, 3 * d)


class LIVEditorTransformerBlock(WanTransformerBlock):
    """A Wan block whose self-attention runs LIVEditorAttnProcessor and owns a coarse-residual gate.

    Its forward is Wan's, with the per-call `SelfAttentionCall` handed to the self-attention.
    """

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, qk_norm: str, cross_attn_norm: bool, eps: float,
                 layer: int = 0):
        super().__init__(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps)
        self.layer = layer
        # Lives on the attention module so the processor reaches it as `attn.coarse_gate`.
        self.attn1.coarse_gate = nn.Linear(dim, 1, bias=False)
        self.attn1.set_processor(LIVEditorAttnProcessor())
        self.attn2.set_processor(LIVEditorCrossAttnProcessor())

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        call: SelfAttentionCall,
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
            self.scale_shift_table + temb.float()
        ).chunk(6, dim=1)
        normed = (self.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
        attn_output = self.attn1(normed, None, None, rotary_emb, call=call, layer=self.layer)
        hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)

        normed = self.norm2(hidden_states.float()).type_as(hidden_states)
        hidden_states = hidden_states + self.attn2(normed, encoder_hidden_states, None, None)

        normed = (self.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(hidden_states)
        ff_output = self.ffn(normed)
        return (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)


class LIVEditorTransformer3DModel(ModelMixin, ConfigMixin, AttentionMixin):
    r"""In-context video editing DiT (LIVEditor).

    Args mirror diffusers' `WanTransformer3DModel` (patch_size, num_attention_heads,
    attention_head_dim, in/out_channels, text_dim, freq_dim, ffn_dim, num_layers, cross_attn_norm,
    qk_norm, eps, rope_max_seq_len) plus:
        attention: "isa" (default) or "dense" self-attention.
        isa_config: the ISAConfig fields as a dict (None: the paper's defaults).
        absolute_position_embedding: add a learned projection of fixed Fourier features of each
            token's (frame, row, column) on the latent grid to the source and context tokens alike
            (the context restarts at the same grid, as with RoPE); False (Wan's model) has none.
            RoPE makes attention weights depend on how far apart two tokens are, but no token's
            value says where it is, so no layer can read off where an object is and compute where
            it moves to. Zero-initialised: adding it to trained weights leaves their function as it was.

    forward(hidden_states, timestep, encoder_hidden_states, context_latents): `hidden_states` is the
    noisy source latent `[B, C, F, H, W]`, `context_latents` the clean input-video latent of the same
    shape, `encoder_hidden_states` the text embeddings `[B, L_text, text_dim]`. Returns the
    prediction for the source only, `[B, out_channels, F, H, W]`.
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["patch_embedding", "context_embedding", "position_embedding", "condition_embedder", "norm"]
    _no_split_modules = ["LIVEditorTransformerBlock"]
    _keep_in_fp32_modules = ["rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]
    _repeated_blocks = ["LIVEditorTransformerBlock"]
    # Starting from weights without it is lossless (zero-initialised, see absolute_position_embedding).
    _keys_to_ignore_on_load_missing = [r"^position_embedding\."]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        rope_max_seq_len: int = 1024,
        attention: str = "isa",
        isa_config: dict | None = None,
        absolute_position_embedding: bool = False,
    ):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if attention_head_dim % 2 or attention_head_dim < 6:
            raise ValueError(f"attention_head_dim must be even and at least 6 for 3D RoPE, got {attention_head_dim}")
        inner_dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels
        self._isa_config = ISAConfig(**isa_config) if isa_config else ISAConfig()

        self.rope = WanRotaryPosEmbed(attention_head_dim, patch_size, rope_max_seq_len)
        self.patch_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
        self.context_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
        self.position_embedding = None
        if absolute_position_embedding:
            self.position_embedding = nn.Linear(3 * (1 + 2 * len(POSITION_FREQUENCIES)), inner_dim, bias=False)
            nn.init.zeros_(self.position_embedding.weight)
        self.condition_embedder = WanTimeTextImageEmbedding(
            dim=inner_dim, time_freq_dim=freq_dim, time_proj_dim=inner_dim * 6, text_embed_dim=text_dim
        )

        self.attention_timer = AttentionTimer()
        self.blocks = nn.ModuleList(
            [
                LIVEditorTransformerBlock(inner_dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps, i)
                for i in range(num_layers)
            ]
        )

        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)
        self.gradient_checkpointing = False
        self._sequence_shard = None  # this rank's SequenceShard under Ulysses (enable_sequence_parallel)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LIVEditorTransformer3DModel":
        """A randomly initialised model with the architecture of preset `name` (see MODEL_PRESETS)."""
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
        return cls(**{**MODEL_PRESETS[name], **overrides})

    # ----- attention mode -------------------------------------------------------------------

    def set_attention_mode(self, mode: str, isa_config: ISAConfig | None = None) -> None:
        """Default attention of every self-attention layer: "isa" or "dense" (exact attention plus
        the gated coarse residual); `isa_config` replaces the ISA knobs.

        Recorded in the model config, so `save_pretrained` keeps it. One call can override both
        with `attention_kwargs` (see forward).
        """
        config = isa_config if isa_config is not None else self._isa_config
        SelfAttentionCall(num_source=1, grid=(1, 1, 1), mode=mode, isa_config=config)  # validates
        self._isa_config = config
        self.register_to_config(attention=mode, isa_config=asdict(config))

    @property
    def attention_mode(self) -> str:
        return self.config.attention

    @property
    def isa_config(self) -> ISAConfig:
        return self._isa_config

    # ----- sequence parallelism ------------------------------------------------------------

    def enable_sequence_parallel(self, group) -> None:
        """Ulysses sequence parallelism over the ranks of `group` (a torch.distributed process
        group; None turns it off). Every rank of the group calls forward with the same inputs and
        gets the same output; each holds 1/degree of the tokens through the blocks and attends on
        1/degree of the heads (`liveditor.models.sequence_parallel`)."""
        self._sequence_shard = None
        if group is not None:
            shard = SequenceShard.of(group)
            shard.check(self.config.num_attention_heads)
            if shard.degree > 1:  # a group of one rank is plain single-process attention
                self._sequence_shard = shard

    # ----- forward --------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        context_latents: torch.Tensor,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ):
        """Predict the flow for the source latent, attending jointly over source and context.

        attention_kwargs: optional, for this call only: "mode" ("isa" | "dense"), "isa_config"
        (ISAConfig) and "callback" (called by every self-attention layer with an AttentionEvent).
        """
        if hidden_states.dim() != 5:
            raise ValueError(f"hidden_states must be [B, C, F, H, W], got shape {tuple(hidden_states.shape)}")
        if context_latents is None or tuple(context_latents.shape) != tuple(hidden_states.shape):
            shape = None if context_latents is None else tuple(context_latents.shape)
            raise ValueError(f"context_latents must have the source's shape {tuple(hidden_states.shape)}, got {shape}")
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        if num_frames % p_t or height % p_h or width % p_w:
            raise ValueError(
                f"latent (frames, height, width) = {(num_frames, height, width)} is not divisible by the patch size "
                f"{tuple(self.config.patch_size)}"
            )
        grid = (num_frames // p_t, height // p_h, width // p_w)
        num_source = math.prod(grid)
        if max(grid) > self.config.rope_max_seq_len:
            raise ValueError(f"latent grid {grid} exceeds rope_max_seq_len={self.config.rope_max_seq_len}")

        # Decoupled RoPE: the context reuses the source's positions, restarting at 0.
        cos, sin = self.rope(hidden_states)
        rotary_emb = (torch.cat([cos, cos], dim=1), torch.cat([sin, sin], dim=1))

        dtype = self.patch_embedding.weight.dtype
        source = self.patch_embedding(hidden_states.to(dtype)).flatten(2).transpose(1, 2)
        context = self.context_embedding(context_latents.to(dtype)).flatten(2).transpose(1, 2)
        if self.position_embedding is not None:
            features = grid_position_features(grid, source.device)
            position = self.position_embedding(features.to(self.position_embedding.weight.dtype)).to(source.dtype)
            source, context = source + position, context + position  # the context restarts on the same grid
        tokens = torch.cat([source, context], dim=1).contiguous()

        if timestep.dim() == 0:
            timestep = timestep.expand(batch_size)
        if timestep.dim() != 1:
            raise ValueError(f"timestep must be a scalar or [B], got shape {tuple(timestep.shape)}")
        temb, timestep_proj, encoder_hidden_states, _ = self.condition_embedder(timestep, encoder_hidden_states)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))

        shard = self._sequence_shard
        if shard is not None:
            # Each rank keeps a contiguous shard of the tokens, with the RoPE of their own positions.
            shard.check(self.config.num_attention_heads, tokens.shape[1])
            tokens = shard.local(tokens)
            rotary_emb = tuple(shard.local(x) for x in rotary_emb)
        call = self._self_attention_call(num_source, grid, attention_kwargs, shard)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(
                    block, tokens, encoder_hidden_states, timestep_proj, rotary_emb, call
                )
            else:
                tokens = block(tokens, encoder_hidden_states, timestep_proj, rotary_emb, call)

        # Only the source is decoded. The head is per token: under sequence parallelism each rank
        # decodes its shard and the (much narrower) outputs are gathered.
        if shard is None:
            tokens = tokens[:, :num_source]
        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        tokens = (self.norm_out(tokens.float()) * (1 + scale.to(tokens.device)) + shift.to(tokens.device)).type_as(
            tokens
        )
        tokens = self.proj_out(tokens)
        if shard is not None:
            tokens = shard.gather(tokens)[:, :num_source]
        tokens = tokens.reshape(batch_size, *grid, p_t, p_h, p_w, -1)
        output = tokens.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    _ATTENTION_KWARGS = ("mode", "isa_config", "callback")

    def _self_attention_call(self, num_source: int, grid: tuple[int, int, int],
                             attention_kwargs: dict[str, Any] | None,
                             sequence_shard: SequenceShard | None = None) -> SelfAttentionCall:
        attention_kwargs = dict(attention_kwargs or {})
        unknown = set(attention_kwargs) - set(self._ATTENTION_KWARGS)
        if unknown:
            raise ValueError(f"unknown attention_kwargs {sorted(unknown)}; supported: {list(self._ATTENTION_KWARGS)}")
        return SelfAttentionCall(
            num_source=num_source,
            grid=grid,
            mode=attention_kwargs.get("mode", self.attention_mode),
            isa_config=attention_kwargs.get("isa_config", self._isa_config),
            callback=attention_kwargs.get("callback"),
            timer=self.attention_timer,
            sequence_shard=sequence_shard,
        )
