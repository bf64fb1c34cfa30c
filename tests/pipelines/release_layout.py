"""The released checkpoint's layout, written down from the facts (spec section 3), for the conversion
tests: every key the real `liveditor_ckpt.bin` has, at any size. Independent of the converter."""

from __future__ import annotations

import math

import torch

# LIVEditor-14B (spec section 3).
SIZE_14B = dict(dim=5120, layers=40, ffn=13824, text_dim=4096, freq_dim=256, in_channels=16, out_channels=16)
TENSORS_14B = 1257
PARAMETERS_14B = 14_289_643_584
# A tiny model with every mechanism (2 heads of 16).
SIZE_TINY = dict(dim=32, layers=2, ffn=64, text_dim=32, freq_dim=32, in_channels=4, out_channels=4)
HEADS_TINY = 2
UNUSED_PER_BLOCK = ("self_attn.alpha_2.weight", "cross_attn.alpha_1.weight", "cross_attn.alpha_2.weight")
WANX = "wanx_unimodel.guidance_model.feedforward_model."


def release_key_shapes(dim, layers, ffn, text_dim, freq_dim, in_channels, out_channels, patch=(1, 2, 2)):
    """{original Wan name: shape} of the release's whole transformer (17 top-level + 31 per block)."""
    shapes = {}
    for conv in ("patch_embedding", "source_video_embedding_more_memory"):
        shapes[f"{conv}.weight"] = (dim, in_channels, *patch)
        shapes[f"{conv}.bias"] = (dim,)
    for name, fan_in, fan_out in (("text_embedding.0", text_dim, dim), ("text_embedding.2", dim, dim),
                                  ("time_embedding.0", freq_dim, dim), ("time_embedding.2", dim, dim),
                                  ("time_projection.1", dim, 6 * dim),
                                  ("head.head", dim, out_channels * math.prod(patch))):
        shapes[f"{name}.weight"] = (fan_out, fan_in)
        shapes[f"{name}.bias"] = (fan_out,)
    shapes["head.modulation"] = (1, 2, dim)
    for i in range(layers):
        b = f"blocks.{i}."
        shapes[b + "modulation"] = (1, 6, dim)
        shapes[b + "norm3.weight"] = (dim,)
        shapes[b + "norm3.bias"] = (dim,)
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                shapes[f"{b}{attn}.{proj}.weight"] = (dim, dim)
                shapes[f"{b}{attn}.{proj}.bias"] = (dim,)
            shapes[f"{b}{attn}.norm_q.weight"] = (dim,)
            shapes[f"{b}{attn}.norm_k.weight"] = (dim,)
            shapes[f"{b}{attn}.alpha_1.weight"] = (1, dim)
            shapes[f"{b}{attn}.alpha_2.weight"] = (1, dim)
        shapes[b + "ffn.0.weight"] = (ffn, dim)
        shapes[b + "ffn.0.bias"] = (ffn,)
        shapes[b + "ffn.2.weight"] = (dim, ffn)
        shapes[b + "ffn.2.bias"] = (dim,)
    return shapes


def release_state_dict(seed: int = 0, size=None) -> dict[str, torch.Tensor]:
    """Seeded weights in the release's naming, scaled like a trained network (well conditioned)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in release_key_shapes(**(size or SIZE_TINY)).items():
        x = torch.randn(*shape, generator=g)
        if key.endswith("modulation"):
            x = x / shape[-1] ** 0.5
        elif "norm" in key and key.endswith(".weight"):
            x = 1.0 + 0.1 * x
        elif "alpha" in key:
            x = x * 3.0 / shape[-1] ** 0.5  # gate logits of order 1: the gate is neither 0 nor saturated
        elif len(shape) >= 2:
            x = x / math.prod(shape[1:]) ** 0.5
        else:
            x = 0.1 * x
        out[key] = x
    return out
