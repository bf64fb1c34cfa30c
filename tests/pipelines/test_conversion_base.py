"""`--base` in the original Wan2.2 layout: Wan's umT5 encoder and Wan2.1 VAE files renamed onto
transformers' UMT5EncoderModel and diffusers' AutoencoderKLWan.

The original names and shapes are written here from the facts of Wan's own modules (t5.py: blocks
of norm1 / attn.{q,k,v,o} / norm2 / ffn.{gate.0,fc1,fc2} / pos_embedding per layer; vae.py:
flat `downsamples` / `upsamples` lists of residual blocks and resamplers, `middle`, `head`,
`conv1` / `conv2`), independently of the converter.
"""

import json
import math

import pytest
import torch
from release_layout import release_state_dict

from liveditor.errors import LIVEditorError
from liveditor.pipelines import load_pipeline
from liveditor.pipelines.conversion import convert_checkpoint
from liveditor.pipelines.conversion.wan_base import umt5_from_original, wan_vae_from_original
from tiny_models import TINY_BUCKETS, tiny_tokenizer

EPS = 1e-6
# umT5-xxl as Wan builds it (t5.py umt5_xxl) and the Wan2.1 VAE (vae.py _video_vae, WanVAE).
UMT5_XXL = dict(vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, heads=64, layers=24, buckets=32)
UMT5_TINY = dict(vocab=len(tiny_tokenizer()), dim=32, dim_attn=32, dim_ffn=64, heads=4, layers=2, buckets=8)
WAN_VAE_LATENTS_MEAN_0, WAN_VAE_LATENTS_STD_0 = -0.7571, 2.8184  # first of Wan's 16 per-channel statistics


# ----- umT5 ---------------------------------------------------------------------------------------

def original_umt5_shapes(vocab, dim, dim_attn, dim_ffn, heads, layers, buckets):
    shapes = {"token_embedding.weight": (vocab, dim), "norm.weight": (dim,)}
    for i in range(layers):
        b = f"blocks.{i}."
        shapes[b + "norm1.weight"] = (dim,)
        for p in "qkv":
            shapes[f"{b}attn.{p}.weight"] = (dim_attn, dim)
        shapes[b + "attn.o.weight"] = (dim, dim_attn)
        shapes[b + "norm2.weight"] = (dim,)
        shapes[b + "ffn.gate.0.weight"] = (dim_ffn, dim)
        shapes[b + "ffn.fc1.weight"] = (dim_ffn, dim)
        shapes[b + "ffn.fc2.weight"] = (dim, dim_ffn)
        shapes[b + "pos_embedding.embedding.weight"] = (buckets, heads)
    return shapes


def original_umt5(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in original_umt5_shapes(**UMT5_TINY).items():
        x = torch.randn(*shape, generator=g)
        if "norm" in key:
            x = 1.0 + 0.1 * x
        elif "pos_embedding" not in key and "token_embedding" not in key:
            x = x / shape[1] ** 0.5
        out[key] = x.to(dtype)
    return out


def wan_t5_encoder(sd, ids, mask, heads, buckets, max_dist=128):
    """Wan's umT5 encoder forward (float64): per-layer bidirectional relative position buckets,
    unscaled attention with masked keys, T5 RMS norms, GELU-tanh gated FFN."""
    sd = {k: v.double() for k, v in sd.items()}
    norm = lambda x, w: x * torch.rsqrt((x**2).mean(-1, keepdim=True) + EPS) * w  # noqa: E731
    L = ids.shape[1]
    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]
    half = buckets // 2
    exact = half // 2
    bucket = (rel > 0).long() * half
    dist = rel.abs()
    large = exact + (torch.log(dist.double().clamp(min=1) / exact) / math.log(max_dist / exact) * (half - exact)).long()
    bucket = bucket + torch.where(dist < exact, dist, large.clamp(max=half - 1))
    x = sd["token_embedding.weight"][ids]
    key_bias = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(mask == 0, -1e30)[:, None, None, :]
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(layers):
        b = f"blocks.{i}."
        h = norm(x, sd[b + "norm1.weight"])
        q, k, v = ((h @ sd[f"{b}attn.{p}.weight"].T).unflatten(-1, (heads, -1)) for p in "qkv")
        bias = sd[b + "pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)[None]
        weights = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) + bias + key_bias, dim=-1)
        x = x + torch.einsum("bhij,bjhd->bihd", weights, v).flatten(2) @ sd[b + "attn.o.weight"].T
        h = norm(x, sd[b + "norm2.weight"])
        gate = h @ sd[b + "ffn.gate.0.weight"].T
        gate = 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)))
        x = x + ((h @ sd[b + "ffn.fc1.weight"].T) * gate) @ sd[b + "ffn.fc2.weight"].T
    return norm(x, sd["norm.weight"])


@pytest.mark.parametrize("seed", [0, 1])
def test_umt5_matches_wans_encoder(seed):
    sd = original_umt5(seed)
    model = umt5_from_original(sd)
    g = torch.Generator().manual_seed(seed + 10)
    ids = torch.randint(3, UMT5_TINY["vocab"], (2, 48), generator=g)
    mask = torch.ones(2, 48, dtype=torch.long)
    mask[1, 30:] = 0
    with torch.no_grad():
        out = model(ids, mask).last_hidden_state
    expected = wan_t5_encoder(sd, ids, mask, UMT5_TINY["heads"], UMT5_TINY["buckets"])
    valid = mask[..., None].bool()
    error = ((out.double() - expected) * valid).norm() / (expected * valid).norm()
    assert error < 1e-5, f"seed {seed}: relative error {error:.2e}"


def test_umt5_xxl_key_list_maps_fully():
    sd = {k: torch.empty(s, device="meta") for k, s in original_umt5_shapes(**UMT5_XXL).items()}
    model = umt5_from_original(sd)
    c = model.config
    assert (c.vocab_size, c.d_model, c.d_kv, c.d_ff, c.num_heads, c.num_layers) == (256384, 4096, 64, 10240, 64, 24)
    assert (c.relative_attention_num_buckets, c.relative_attention_max_distance) == (32, 128)


def test_umt5_unknown_or_missing_keys_are_one_line_errors():
    sd = original_umt5(0)
    sd["blocks.0.attn.extra.weight"] = torch.randn(2)
    with pytest.raises(LIVEditorError, match=r"umt5-xxl-enc-bf16.pth has 1 key\(s\) .*blocks.0.attn.extra.weight"):
        umt5_from_original(sd)
    sd = original_umt5(0)
    del sd["blocks.1.ffn.fc2.weight"]
    with pytest.raises(LIVEditorError, match=r"lacks 1 weight\(s\) .*encoder.block.1.layer.1.DenseReluDense.wo.weight"):
        umt5_from_original(sd)


# ----- Wan2.1 VAE ---------------------------------------------------------------------------------

def original_wan_vae_shapes(dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                            temporal_downsample=(False, True, True)):
    shapes = {}

    def residual(prefix, a, o):
        shapes[prefix + "residual.0.gamma"] = (a, 1, 1, 1)
        shapes[prefix + "residual.2.weight"] = (o, a, 3, 3, 3)
        shapes[prefix + "residual.2.bias"] = (o,)
        shapes[prefix + "residual.3.gamma"] = (o, 1, 1, 1)
        shapes[prefix + "residual.6.weight"] = (o, o, 3, 3, 3)
        shapes[prefix + "residual.6.bias"] = (o,)
        if a != o:
            shapes[prefix + "shortcut.weight"] = (o, a, 1, 1, 1)
            shapes[prefix + "shortcut.bias"] = (o,)

    def middle(prefix, d):
        residual(prefix + "0.", d, d)
        shapes[prefix + "1.norm.gamma"] = (d, 1, 1)
        shapes[prefix + "1.to_qkv.weight"] = (3 * d, d, 1, 1)
        shapes[prefix + "1.to_qkv.bias"] = (3 * d,)
        shapes[prefix + "1.proj.weight"] = (d, d, 1, 1)
        shapes[prefix + "1.proj.bias"] = (d,)
        residual(prefix + "2.", d, d)

    def resample(prefix, d, up, temporal):
        out = d // 2 if up else d
        shapes[prefix + "resample.1.weight"] = (out, d, 3, 3)
        shapes[prefix + "resample.1.bias"] = (out,)
        if temporal:
            shapes[prefix + "time_conv.weight"] = (2 * d if up else d, d, 3, 1, 1)
            shapes[prefix + "time_conv.bias"] = (2 * d if up else d,)

    dims = [dim * u for u in (1, *dim_mult)]
    shapes["encoder.conv1.weight"], shapes["encoder.conv1.bias"] = (dims[0], 3, 3, 3, 3), (dims[0],)
    index = 0
    for i, (a, o) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(num_res_blocks):
            residual(f"encoder.downsamples.{index}.", a, o)
            a, index = o, index + 1
        if i != len(dim_mult) - 1:
            resample(f"encoder.downsamples.{index}.", o, up=False, temporal=temporal_downsample[i])
            index += 1
    middle("encoder.middle.", dims[-1])
    shapes["encoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    shapes["encoder.head.2.weight"], shapes["encoder.head.2.bias"] = (2 * z_dim, dims[-1], 3, 3, 3), (2 * z_dim,)
    shapes["conv1.weight"], shapes["conv1.bias"] = (2 * z_dim, 2 * z_dim, 1, 1, 1), (2 * z_dim,)
    shapes["conv2.weight"], shapes["conv2.bias"] = (z_dim, z_dim, 1, 1, 1), (z_dim,)

    dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
    temporal_upsample = temporal_downsample[::-1]
    shapes["decoder.conv1.weight"], shapes["decoder.conv1.bias"] = (dims[0], z_dim, 3, 3, 3), (dims[0],)
    middle("decoder.middle.", dims[0])
    index = 0
    for i, (a, o) in enumerate(zip(dims[:-1], dims[1:])):
        if i in (1, 2, 3):
            a = a // 2
        for _ in range(num_res_blocks + 1):
            residual(f"decoder.upsamples.{index}.", a, o)
            a, index = o, index + 1
        if i != len(dim_mult) - 1:
            resample(f"decoder.upsamples.{index}.", o, up=True, temporal=temporal_upsample[i])
            index += 1
    shapes["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    shapes["decoder.head.2.weight"], shapes["decoder.head.2.bias"] = (3, dims[-1], 3, 3, 3), (3,)
    return shapes


# diffusers' names for Wan2.1's VAE (its conversion script's table for this architecture).
_RESIDUAL = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
             "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
             "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}
_DECODER_RESNETS = {0: (0, 0), 1: (0, 1), 2: (0, 2), 4: (1, 0), 5: (1, 1), 6: (1, 2), 8: (2, 0), 9: (2, 1),
                    10: (2, 2), 12: (3, 0), 13: (3, 1), 14: (3, 2)}
_DECODER_UPSAMPLERS = {3: 0, 7: 1, 11: 2}


def diffusers_vae_name(key):
    top = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
    parts = key.split(".")
    if parts[0] in top:
        return f"{top[parts[0]]}.{parts[1]}"
    side, part, rest = parts[0], parts[1], ".".join(parts[2:])
    if part == "conv1":
        return f"{side}.conv_in.{rest}"
    if part == "head":
        return f"{side}.{'norm_out' if rest.startswith('0.') else 'conv_out'}.{parts[-1]}"
    index, leaf = int(parts[2]), ".".join(parts[3:])
    if part == "middle":
        return (f"{side}.mid_block.attentions.0.{leaf}" if index == 1
                else f"{side}.mid_block.resnets.{index // 2}.{_RESIDUAL[leaf]}")
    if part == "downsamples":
        return f"encoder.down_blocks.{index}.{_RESIDUAL.get(leaf, leaf)}"
    if index in _DECODER_UPSAMPLERS:
        return f"decoder.up_blocks.{_DECODER_UPSAMPLERS[index]}.upsamplers.0.{leaf}"
    stage, j = _DECODER_RESNETS[index]
    return f"decoder.up_blocks.{stage}.resnets.{j}.{_RESIDUAL[leaf]}"


def tiny_diffusers_vae(seed, base_dim=8):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=base_dim, z_dim=16).eval()


def to_original_vae(vae, base_dim=8):
    state = vae.state_dict()
    return {k: state[diffusers_vae_name(k)].clone() for k in original_wan_vae_shapes(dim=base_dim)}


def test_wan_vae_original_layout_is_the_diffusers_one():
    original = original_wan_vae_shapes(dim=8)
    reference = tiny_diffusers_vae(0).state_dict()
    renamed = {diffusers_vae_name(k): tuple(s) for k, s in original.items()}
    assert renamed == {k: tuple(v.shape) for k, v in reference.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_wan_vae_round_trip(seed):
    reference = tiny_diffusers_vae(seed)
    original = to_original_vae(reference)
    converted = wan_vae_from_original(original)
    state = converted.state_dict()
    for key, value in original.items():
        torch.testing.assert_close(state[diffusers_vae_name(key)], value, rtol=0, atol=0, msg=key)
    assert converted.config.latents_mean[0] == WAN_VAE_LATENTS_MEAN_0
    assert converted.config.latents_std[0] == WAN_VAE_LATENTS_STD_0
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        z = converted.encode(video).latent_dist.mode()
        torch.testing.assert_close(z, reference.encode(video).latent_dist.mode(), rtol=0, atol=0)
        torch.testing.assert_close(converted.decode(z).sample, reference.decode(z).sample, rtol=0, atol=0)


def test_wan21_vae_key_list_maps_fully():
    sd = {k: torch.empty(s, device="meta") for k, s in original_wan_vae_shapes().items()}
    vae = wan_vae_from_original(sd)
    assert vae.config.base_dim == 96 and vae.config.z_dim == 16
    parameters = sum(math.prod(s) for s in original_wan_vae_shapes().values())
    assert sum(v.numel() for v in vae.state_dict().values()) == parameters


def test_vae_strictness_errors():
    original = to_original_vae(tiny_diffusers_vae(0))
    original["decoder.upsamples.15.residual.0.gamma"] = torch.ones(8, 1, 1, 1)
    with pytest.raises(LIVEditorError, match=r"Wan2.1_VAE.pth has 1 key\(s\) .*decoder.upsamples.15.residual.0.gamma"):
        wan_vae_from_original(original)
    original = to_original_vae(tiny_diffusers_vae(0))
    original["decoder.upsamples.4.shortcut.weight"] = torch.randn(16, 8, 1, 1, 1)
    with pytest.raises(LIVEditorError, match=r"decoder.up_blocks.1.resnets.0.conv_shortcut.weight \(16, 8, 1, 1, 1\)"):
        wan_vae_from_original(original)


# ----- a whole conversion from the original folder ------------------------------------------------

@pytest.fixture(scope="module")
def original_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("original") / "Wan2.2-T2V-A14B"
    (base / "google").mkdir(parents=True)
    tiny_tokenizer().save_pretrained(base / "google" / "umt5-xxl")
    torch.save(original_umt5(0, torch.bfloat16), base / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save(to_original_vae(tiny_diffusers_vae(0)), base / "Wan2.1_VAE.pth")
    (base / "high_noise_model").mkdir()
    (base / "high_noise_model" / "config.json").write_text(json.dumps({"dim": 32, "num_heads": 2, "num_layers": 2}))
    return base


def test_converts_from_the_original_base_folder(tmp_path, original_base):
    size = dict(dim=32, layers=2, ffn=64, text_dim=32, freq_dim=32, in_channels=16, out_channels=16)
    torch.save({"model_ema." + k: v for k, v in release_state_dict(seed=9, size=size).items()}, tmp_path / "ckpt.bin")
    report = convert_checkpoint(tmp_path / "ckpt.bin", original_base, tmp_path / "out", resolution_buckets=TINY_BUCKETS)
    assert "original Wan2.2 folder" in report.summary()
    assert not list(report.out.rglob("*.pth")) and not list(report.out.rglob("*.bin"))
    pipe = load_pipeline(report.out)
    assert pipe.transformer.config.num_attention_heads == 2

    tokens = pipe.tokenizer(["make it blue"], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        out = pipe.text_encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
    expected = wan_t5_encoder(original_umt5(0, torch.bfloat16), tokens.input_ids, tokens.attention_mask,
                              UMT5_TINY["heads"], UMT5_TINY["buckets"])
    valid = tokens.attention_mask[..., None].bool()
    assert ((out.double() - expected) * valid).norm() / (expected * valid).norm() < 1e-5

    reference = tiny_diffusers_vae(0)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(pipe.vae.state_dict()[key], value, rtol=0, atol=0, msg=key)

    pipe.set_progress_bar_config(disable=True)
    result = pipe(torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(3)), "make it blue", num_inference_steps=1, seed=0)
    assert result.frames.shape == (1, 5, 64, 64, 3) and result.frames.std() > 0


def test_incomplete_original_base_is_named(tmp_path, original_base):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(original_base, base)
    (base / "Wan2.1_VAE.pth").unlink()
    torch.save(release_state_dict(), tmp_path / "ckpt.bin")
    with pytest.raises(LIVEditorError, match="looks like the original Wan2.2 layout but lacks Wan2.1_VAE.pth"):
        convert_checkpoint(tmp_path / "ckpt.bin", base, tmp_path / "out")
    assert not (tmp_path / "out").exists()
