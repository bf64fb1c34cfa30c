"""The Wan2.2 base components a LIVEditor folder needs (tokenizer, umT5 encoder, VAE), from either
layout of the Wan2.2-T2V-A14B folder.

- diffusers layout (`Wan2.2-T2V-A14B-Diffusers`): `tokenizer/`, `text_encoder/`, `vae/`,
  `transformer/config.json`; the components are copied (re-saved as safetensors if pickled).
- original layout (`Wan2.2-T2V-A14B`, what the release's users hold): `models_t5_umt5-xxl-enc-bf16.pth`
  (Wan's own umT5 encoder naming), `Wan2.1_VAE.pth` (Wan's own VAE naming), the `google/umt5-xxl`
  tokenizer folder and `high_noise_model/config.json`. The two weight files are renamed onto
  transformers' `UMT5EncoderModel` and diffusers' `AutoencoderKLWan` under the same rule as the
  transformer: every weight filled with its shape, no key left over.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ...errors import LIVEditorError
from .release import read_checkpoint_file
from .strict import check_weights, first_line

ORIGINAL_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
ORIGINAL_VAE_FILE = "Wan2.1_VAE.pth"
ORIGINAL_TOKENIZER_DIR = "google/umt5-xxl"
ORIGINAL_TRANSFORMER_CONFIG = "high_noise_model/config.json"  # the expert LIVEditor starts from
DIFFUSERS_COMPONENTS = ("tokenizer", "text_encoder", "vae")
BASE_LAYOUTS = ("diffusers", "original")

# Wan's T5 relative position embedding buckets distances up to 128 (its default, kept by umT5-xxl).
UMT5_MAX_DISTANCE = 128
# Wan2.1 VAE architecture (Wan's `_video_vae` defaults); the base width is read from the weights.
WAN_VAE_DIM_MULT = (1, 2, 4, 4)
WAN_VAE_NUM_RES_BLOCKS = 2
WAN_VAE_TEMPORAL_DOWNSAMPLE = (False, True, True)
WAN_VAE_Z_DIM = 16


def base_layout(base: Path) -> str:
    """"diffusers" or "original"; a one-line error naming what is missing otherwise."""
    if not base.is_dir():
        raise LIVEditorError(f"base folder {base} does not exist")
    if all((base / name).is_dir() for name in DIFFUSERS_COMPONENTS):
        return "diffusers"
    original = (ORIGINAL_T5_FILE, ORIGINAL_VAE_FILE, ORIGINAL_TOKENIZER_DIR)
    present = [name for name in original if (base / name).exists()]
    if present:
        missing = [name for name in original if name not in present]
        if missing:
            raise LIVEditorError(
                f"base folder {base} looks like the original Wan2.2 layout but lacks {', '.join(missing)}")
        return "original"
    raise LIVEditorError(
        f"base folder {base} is neither a diffusers Wan2.2 folder ({', '.join(n + '/' for n in DIFFUSERS_COMPONENTS)}) "
        f"nor the original one ({', '.join(original)})"
    )


def base_num_heads(base: Path, layout: str) -> int | None:
    """The base transformer's attention head count from its config, when the folder has one."""
    path, key = ((base / "transformer" / "config.json", "num_attention_heads") if layout == "diffusers"
                 else (base / ORIGINAL_TRANSFORMER_CONFIG, "num_heads"))
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get(key)
    except (OSError, ValueError) as exc:
        raise LIVEditorError(f"base config {path} is not valid JSON ({exc})") from exc
    return int(value) if value is not None else None


def write_base_components(base: Path, out: Path, layout: str) -> dict[str, list[str]]:
    """Write tokenizer/, text_encoder/ and vae/ into `out`; returns their model_index entries."""
    if layout == "diffusers":
        for name in DIFFUSERS_COMPONENTS:
            _copy_diffusers_component(base, out, name)
        return {name: _library_and_class(base, name) for name in DIFFUSERS_COMPONENTS}
    tokenizer_class = _copy_tokenizer(base / ORIGINAL_TOKENIZER_DIR, out / "tokenizer")
    umt5_from_original(read_checkpoint_file(base / ORIGINAL_T5_FILE, "umT5 weights")).save_pretrained(
        out / "text_encoder", safe_serialization=True)
    wan_vae_from_original(read_checkpoint_file(base / ORIGINAL_VAE_FILE, "VAE weights")).save_pretrained(
        out / "vae", safe_serialization=True)
    return {
        "tokenizer": ["transformers", tokenizer_class],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }


# ----- diffusers layout --------------------------------------------------------------------------


def _copy_diffusers_component(base: Path, out: Path, name: str) -> None:
    """Copy a component folder; re-save it as safetensors when it holds pickled weights."""
    src = base / name
    pickled = [p for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    if not pickled or name == "tokenizer":
        shutil.copytree(src, out / name)
        return
    if name == "vae":
        from diffusers import AutoencoderKLWan

        AutoencoderKLWan.from_pretrained(src).save_pretrained(out / name, safe_serialization=True)
    else:
        from transformers import AutoModel

        AutoModel.from_pretrained(src).save_pretrained(out / name, safe_serialization=True)


def _library_and_class(base: Path, name: str) -> list[str]:
    """The (library, class) of a base component, from its model_index.json or the Wan defaults."""
    index_file = base / "model_index.json"
    if index_file.is_file():
        entry = json.loads(index_file.read_text()).get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[0]:
            return entry
    return {"tokenizer": ["transformers", "AutoTokenizer"], "text_encoder": ["transformers", "UMT5EncoderModel"],
            "vae": ["diffusers", "AutoencoderKLWan"]}[name]


def _copy_tokenizer(src: Path, dst: Path) -> str:
    """Copy the tokenizer folder and check that transformers loads it; returns its class name."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    try:
        tokenizer = AutoTokenizer.from_pretrained(dst)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise LIVEditorError(f"tokenizer folder {src} cannot be loaded by transformers: {first_line(exc)}") from exc
    return type(tokenizer).__name__


# ----- original umT5 encoder (Wan's t5.py naming) -> transformers UMT5EncoderModel ---------------

_UMT5_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    # umT5: every layer has its own relative position buckets.
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    # Wan: fc2(fc1(x) * gelu_tanh(gate(x))); transformers: wo(gelu_new(wi_0(x)) * wi_1(x)).
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_NUMBERED = re.compile(r"^blocks\.(\d+)\.(.+)$")


def umt5_keys(key: str) -> list[str]:
    """transformers names of an original umT5-encoder key ([] if it has none); the token embedding
    fills both `shared` and the encoder's (tied) `embed_tokens`."""
    if key == "token_embedding.weight":
        return ["shared.weight", "encoder.embed_tokens.weight"]
    if key == "norm.weight":
        return ["encoder.final_layer_norm.weight"]
    match = _NUMBERED.match(key)
    if match and match.group(2) in _UMT5_BLOCK:
        return [f"encoder.block.{match.group(1)}.{_UMT5_BLOCK[match.group(2)]}"]
    return []


def umt5_config_from_original(state_dict: dict):
    """transformers UMT5Config of an original umT5 encoder, read from its weight shapes."""
    from transformers import UMT5Config

    try:
        vocab_size, d_model = state_dict["token_embedding.weight"].shape
        num_buckets, num_heads = state_dict["blocks.0.pos_embedding.embedding.weight"].shape
        dim_attn = state_dict["blocks.0.attn.q.weight"].shape[0]
        d_ff = state_dict["blocks.0.ffn.fc1.weight"].shape[0]
    except KeyError as exc:
        raise LIVEditorError(f"{ORIGINAL_T5_FILE} is not Wan's umT5 encoder: it has no {exc.args[0]}") from exc
    num_layers = 1 + max(int(m.group(1)) for k in state_dict if (m := _NUMBERED.match(k)))
    return UMT5Config(
        vocab_size=int(vocab_size),
        d_model=int(d_model),
        d_kv=int(dim_attn // num_heads),
        d_ff=int(d_ff),
        num_layers=num_layers,
        num_heads=int(num_heads),
        relative_attention_num_buckets=int(num_buckets),
        relative_attention_max_distance=UMT5_MAX_DISTANCE,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        architectures=["UMT5EncoderModel"],
    )


def umt5_from_original(state_dict: dict):
    """transformers UMT5EncoderModel holding an original umT5 encoder's weights (strict)."""
    from transformers import UMT5EncoderModel

    config = umt5_config_from_original(state_dict)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    mapped, unknown = {}, []
    for key, value in state_dict.items():
        targets = umt5_keys(key)
        if not targets:
            unknown.append(key)
        for target in targets:
            mapped[target] = value
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_weights(ORIGINAL_T5_FILE, expected, mapped, unknown)
    model.load_state_dict({k: v.contiguous() for k, v in mapped.items()}, strict=True, assign=True)
    model.set_input_embeddings(model.shared)  # re-tie after assignment
    return model.eval()


# ----- original Wan2.1 VAE (Wan's vae.py naming) -> diffusers AutoencoderKLWan -------------------

_VAE_RESIDUAL = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
_VAE_RESAMPLE = ("resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias")
_VAE_ATTENTION = ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")
_VAE_TOP = {
    "conv1.weight": "quant_conv.weight",
    "conv1.bias": "quant_conv.bias",
    "conv2.weight": "post_quant_conv.weight",
    "conv2.bias": "post_quant_conv.bias",
}
_VAE_PART = re.compile(r"^(encoder|decoder)\.(conv1|head|middle|downsamples|upsamples)\.(.+)$")
_INDEXED = re.compile(r"^(\d+)\.(.+)$")


def wan_vae_key(key: str, num_res_blocks: int = WAN_VAE_NUM_RES_BLOCKS) -> str | None:
    """The AutoencoderKLWan name of an original Wan-VAE key, or None if it has none.

    Wan keeps the encoder's residual and downsampling layers in one flat list (diffusers keeps the
    same flat indices) and the decoder's in one flat list of stages, each `num_res_blocks + 1`
    residual blocks then one upsampler (none after the last stage); diffusers nests the decoder as
    `up_blocks.{stage}.resnets.{j}` / `up_blocks.{stage}.upsamplers.0`.
    """
    if key in _VAE_TOP:
        return _VAE_TOP[key]
    match = _VAE_PART.match(key)
    if not match:
        return None
    side, part, rest = match.groups()
    if part == "conv1":
        return f"{side}.conv_in.{rest}" if rest in ("weight", "bias") else None
    if part == "head":
        return {"0.gamma": f"{side}.norm_out.gamma", "2.weight": f"{side}.conv_out.weight",
                "2.bias": f"{side}.conv_out.bias"}.get(rest)
    indexed = _INDEXED.match(rest)
    if not indexed:
        return None
    index, leaf = int(indexed.group(1)), indexed.group(2)
    if part == "middle":
        if index == 1:
            return f"{side}.mid_block.attentions.0.{leaf}" if leaf in _VAE_ATTENTION else None
        if index in (0, 2) and leaf in _VAE_RESIDUAL:
            return f"{side}.mid_block.resnets.{index // 2}.{_VAE_RESIDUAL[leaf]}"
        return None
    if part == "downsamples":
        if leaf in _VAE_RESIDUAL:
            return f"encoder.down_blocks.{index}.{_VAE_RESIDUAL[leaf]}"
        return f"encoder.down_blocks.{index}.{leaf}" if leaf in _VAE_RESAMPLE else None
    stage, position = divmod(index, num_res_blocks + 2)
    if position <= num_res_blocks and leaf in _VAE_RESIDUAL:
        return f"decoder.up_blocks.{stage}.resnets.{position}.{_VAE_RESIDUAL[leaf]}"
    if position == num_res_blocks + 1 and leaf in _VAE_RESAMPLE:
        return f"decoder.up_blocks.{stage}.upsamplers.0.{leaf}"
    return None


def wan_vae_from_original(state_dict: dict):
    """diffusers AutoencoderKLWan holding an original Wan2.1 VAE's weights (strict).

    The latent normalisation (per-channel mean and std) is not in the file: Wan's code holds it,
    and AutoencoderKLWan's defaults are the same 16 values.
    """
    from diffusers import AutoencoderKLWan

    try:
        base_dim = int(state_dict["encoder.conv1.weight"].shape[0])
        z_dim = int(state_dict["conv2.weight"].shape[0])
    except KeyError as exc:
        raise LIVEditorError(f"{ORIGINAL_VAE_FILE} is not Wan's VAE: it has no {exc.args[0]}") from exc
    if z_dim != WAN_VAE_Z_DIM:
        raise LIVEditorError(f"{ORIGINAL_VAE_FILE} has {z_dim} latent channels; the Wan2.1 VAE has {WAN_VAE_Z_DIM}")
    with torch.device("meta"):
        model = AutoencoderKLWan(base_dim=base_dim, z_dim=z_dim, dim_mult=list(WAN_VAE_DIM_MULT),
                                 num_res_blocks=WAN_VAE_NUM_RES_BLOCKS,
                                 temperal_downsample=list(WAN_VAE_TEMPORAL_DOWNSAMPLE))
    mapped, unknown = {}, []
    for key, value in state_dict.items():
        target = wan_vae_key(key)
        if target is None:
            unknown.append(key)
        else:
            mapped[target] = value
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_weights(ORIGINAL_VAE_FILE, expected, mapped, unknown)
    model.load_state_dict({k: v.contiguous() for k, v in mapped.items()}, strict=True, assign=True)
    return model.eval()
