"""A converted model computes the release's function.

`release_forward` below is an independent, token-level float64 implementation of the release's
transformer forward, written from the facts (spec section 3, "What the release does at
inference") and Wan's architecture, reading the weights under their ORIGINAL names:
- source tokens from `patch_embedding`, context tokens from their own `source_video_embedding_more_memory`,
  concatenated `[source | context]`;
- one sinusoidal timestep embedding for the whole sequence (`time_embedding`, `time_projection`,
  6 modulation vectors per block from `blocks.i.modulation`);
- decoupled 3D RoPE: the context restarts at position 0 on the same (f, h, w) grid;
- Wan's block: modulated LayerNorm -> self-attention (q/k RMSNorm across heads) -> gated residual;
  `norm3` (affine LayerNorm) -> cross-attention to the text -> residual; modulated LayerNorm ->
  GELU-tanh FFN -> gated residual;
- the coarse residual `gate * broadcast(P @ Vc)` with `gate = (sigmoid(alpha_1(y)) - 0.5) * 0.5`
  on the modulated input `y`, added to the attention output BEFORE the output projection;
- the head decodes the source tokens only (`head.modulation`, `head.head`).
The converted LIVEditorTransformer3DModel must match it to 1e-4 relative in dense mode and in ISA
mode with every ratio at 1, on segments of whole 64-token blocks.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from release_layout import HEADS_TINY, SIZE_TINY, release_state_dict

from liveditor.isa import ISAConfig
from liveditor.pipelines.conversion import build_transformer, release_entries

BLOCK = 64
EPS = 1e-6


def _linear(sd, name, h):
    return h @ sd[name + ".weight"].T + sd[name + ".bias"]


def _layer_norm(h, weight=None, bias=None):
    mean = h.mean(-1, keepdim=True)
    out = (h - mean) / torch.sqrt(((h - mean) ** 2).mean(-1, keepdim=True) + EPS)
    return out if weight is None else out * weight + bias


def _rms_norm(h, weight):
    return h * torch.rsqrt((h**2).mean(-1, keepdim=True) + EPS) * weight


def _gelu_tanh(h):
    return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))


def _silu(h):
    return h * torch.sigmoid(h)


def _rope_angles(grid, head_dim, offset=0):
    """[N, head_dim/2] rotation angles of Wan's 3D RoPE (frame, row, column axes) on a raster grid."""
    f, h, w = grid
    axis_dims = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    positions = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    positions = positions.reshape(-1, 3).double() + offset
    angles = []
    for axis, n in enumerate(axis_dims):
        inv = 1.0 / 10000 ** (torch.arange(0, n, 2, dtype=torch.float64) / n)
        angles.append(positions[:, axis : axis + 1] * inv)
    return torch.cat(angles, dim=1)


def _rotate(x, angles):
    """Rotate channel pairs (2i, 2i+1) of x [B, N, H, D] by angles [N, D/2] (complex multiplication)."""
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    rotation = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    return torch.view_as_real(pairs * rotation).flatten(-2)


def _attention(q, k, v):
    """q [B, Nq, H, D], k/v [B, Nk, H, D] -> [B, Nq, H, D]."""
    weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1]), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v)


def _coarse(q, k, v):
    """broadcast(P @ Vc) over 64-token blocks of the whole sequence, [B, N, H, D]."""
    pool = lambda x: x.reshape(x.shape[0], -1, BLOCK, *x.shape[2:]).mean(2)  # noqa: E731
    out = _attention(pool(q), pool(k), pool(v))
    return out.repeat_interleave(BLOCK, dim=1)


def release_forward(sd, latents, context_latents, timestep, text, heads, *, residual=True, decoupled_rope=True,
                    context_embedding="source_video_embedding_more_memory"):
    """The release's transformer forward on original-named weights (float64). The keyword arguments
    switch single facts off, to show the comparison would notice each one."""
    sd = {k: v.double() for k, v in sd.items()}
    latents, context_latents, text = latents.double(), context_latents.double(), text.double()
    B, _, F_, H_, W_ = latents.shape
    patch = tuple(sd["patch_embedding.weight"].shape[2:])
    grid = (F_ // patch[0], H_ // patch[1], W_ // patch[2])
    dim = sd["patch_embedding.weight"].shape[0]
    head_dim = dim // heads

    def embed(name, lat):
        return F.conv3d(lat, sd[name + ".weight"], sd[name + ".bias"], stride=patch).flatten(2).transpose(1, 2)

    source = embed("patch_embedding", latents)
    context = embed(context_embedding, context_latents)
    x = torch.cat([source, context], dim=1)
    num_source = source.shape[1]

    freq_dim = sd["time_embedding.0.weight"].shape[1]
    half = freq_dim // 2
    args = timestep.double()[:, None] * 10000 ** (-torch.arange(half, dtype=torch.float64) / half)
    e = _linear(sd, "time_embedding.2", _silu(_linear(sd, "time_embedding.0", torch.cat([args.cos(), args.sin()], 1))))
    e0 = _linear(sd, "time_projection.1", _silu(e)).unflatten(1, (6, dim))
    text = _linear(sd, "text_embedding.2", _gelu_tanh(_linear(sd, "text_embedding.0", text)))

    angles = torch.cat([_rope_angles(grid, head_dim),
                        _rope_angles(grid, head_dim, offset=0 if decoupled_rope else grid[0])], dim=0)
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(layers):
        b = f"blocks.{i}."
        m = (sd[b + "modulation"] + e0).chunk(6, dim=1)  # shift, scale, gate (attn); shift, scale, gate (ffn)
        y = _layer_norm(x) * (1 + m[1]) + m[0]
        q = _rms_norm(_linear(sd, b + "self_attn.q", y), sd[b + "self_attn.norm_q.weight"]).unflatten(2, (heads, -1))
        k = _rms_norm(_linear(sd, b + "self_attn.k", y), sd[b + "self_attn.norm_k.weight"]).unflatten(2, (heads, -1))
        v = _linear(sd, b + "self_attn.v", y).unflatten(2, (heads, -1))
        q, k = _rotate(q, angles), _rotate(k, angles)
        out = _attention(q, k, v)
        if residual:
            gate = (torch.sigmoid(y @ sd[b + "self_attn.alpha_1.weight"].T) - 0.5) * 0.5  # [B, N, 1]
            out = out + gate[..., None] * _coarse(q, k, v)
        x = x + _linear(sd, b + "self_attn.o", out.flatten(2)) * m[2]

        c = _layer_norm(x, sd[b + "norm3.weight"], sd[b + "norm3.bias"])
        cq = _rms_norm(_linear(sd, b + "cross_attn.q", c), sd[b + "cross_attn.norm_q.weight"]).unflatten(2, (heads, -1))
        ck = _rms_norm(_linear(sd, b + "cross_attn.k", text), sd[b + "cross_attn.norm_k.weight"])
        ck = ck.unflatten(2, (heads, -1))
        cv = _linear(sd, b + "cross_attn.v", text).unflatten(2, (heads, -1))
        x = x + _linear(sd, b + "cross_attn.o", _attention(cq, ck, cv).flatten(2))

        h = _linear(sd, b + "ffn.2", _gelu_tanh(_linear(sd, b + "ffn.0", _layer_norm(x) * (1 + m[4]) + m[3])))
        x = x + h * m[5]

    shift, scale = (sd["head.modulation"] + e[:, None]).chunk(2, dim=1)
    out = _linear(sd, "head.head", _layer_norm(x[:, :num_source]) * (1 + scale) + shift)
    out = out.reshape(B, *grid, *patch, -1)
    out = torch.einsum("bfhwpqrc->bcfphqwr", out)
    return out.reshape(B, out.shape[1], F_, H_, W_)


def _relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    # latent (2, 16, 32) with patch (1, 2, 2): a (2, 8, 16) grid = 256 tokens = 4 whole blocks per segment.
    latents = torch.randn(2, SIZE_TINY["in_channels"], 2, 16, 32, generator=g)
    context = torch.randn(2, SIZE_TINY["in_channels"], 2, 16, 32, generator=g)
    text = torch.randn(2, 7, SIZE_TINY["text_dim"], generator=g)
    text[1, 4:] = 0  # a shorter prompt, zero-padded as the pipeline and the release pass it
    timestep = torch.tensor([937.5, 250.0])
    return latents, context, timestep, text


@pytest.fixture(scope="module", params=[0, 1])
def converted(request):
    seed = request.param
    sd = release_state_dict(seed=seed)
    model, _ = build_transformer(release_entries({"model_ema." + k: v for k, v in sd.items()}), num_heads=HEADS_TINY)
    return seed, sd, model


ALL_EXACT = ISAConfig(select_ratio=1.0, full_ratio=1.0, exact_ratio=1.0, sharpness="topk")


@pytest.mark.parametrize("mode, isa_config", [("dense", None), ("isa", ALL_EXACT)])
def test_converted_model_matches_the_release_forward(converted, mode, isa_config):
    seed, sd, model = converted
    latents, context, timestep, text = _inputs(seed)
    expected = release_forward(sd, latents, context, timestep, text, HEADS_TINY)
    kwargs = {"mode": mode} if isa_config is None else {"mode": mode, "isa_config": isa_config}
    with torch.no_grad():
        out = model(latents, timestep, text, context_latents=context, attention_kwargs=kwargs).sample
    assert out.shape == expected.shape
    error = _relative(out, expected)
    assert error < 1e-4, f"seed {seed}, {mode}: relative error {error:.2e}"


@pytest.mark.parametrize("fact", ["residual", "decoupled_rope", "context_embedding"])
def test_the_comparison_sees_each_fact(converted, fact):
    """Dropping any one fact from the reference moves it ten times beyond the tolerance or more: the parity test
    checks each of them."""
    seed, sd, model = converted
    latents, context, timestep, text = _inputs(seed)
    wrong = {"residual": False, "decoupled_rope": False, "context_embedding": "patch_embedding"}[fact]
    variant = release_forward(sd, latents, context, timestep, text, HEADS_TINY, **{fact: wrong})
    with torch.no_grad():
        out = model(latents, timestep, text, context_latents=context, attention_kwargs={"mode": "dense"}).sample
    assert _relative(out, variant) > 1e-3, f"seed {seed}: the reference without {fact} still matches"
