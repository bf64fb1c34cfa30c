"""Convert the released LIVEditor checkpoint (original Wan layout) into a diffusers pipeline folder.

The release ships `liveditor_ckpt.bin`, a torch pickle of the transformer in the original Wan
naming (spec section 3). `convert_checkpoint` renames it onto `LIVEditorTransformer3DModel`,
refuses any missing or unexpected weight except the known unused ones, and writes a complete
pipeline folder in safetensors, taking the tokenizer, umT5 text encoder and VAE from a Wan2.2
diffusers folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import LIVEditorError

# Key prefixes the released training code may have left on every weight.
CHECKPOINT_PREFIXES = ("wanx_unimodel.guidance_model.feedforward_model.", "model_ema.", "model.", "module.")
# Weights that exist in the release but that the model does not use.
KNOWN_UNUSED = (re.compile(r"^blocks\.\d+\.self_attn\.alpha_2\.weight$"),)
# Non-model entries: the VAE copy and optimizer / scheduler state.
NON_MODEL_PREFIXES = ("vae.", "optimizer", "lr_scheduler", "scheduler", "ema_state", "step", "epoch")

_TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "source_video_embedding_more_memory": "context_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
_BLOCK_LEVEL = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "self_attn.alpha_1": "attn1.coarse_gate",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    # Original Wan calls the cross-attention norm norm3 (diffusers: norm2).
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_PARAM_KEY = re.compile(r"^(.+)\.(weight|bias)$")


def original_to_diffusers_key(key: str) -> str | None:
    """The model's name for an original-layout key (prefix already stripped), or None if unknown."""
    if key == "head.modulation":
        return "scale_shift_table"
    block_mod = re.match(r"^blocks\.(\d+)\.modulation$", key)
    if block_mod:
        return f"blocks.{block_mod.group(1)}.scale_shift_table"
    match = _BLOCK_KEY.match(key)
    if match:
        index, module, kind = match.groups()
        target = _BLOCK_LEVEL.get(module)
        return None if target is None else f"blocks.{index}.{target}.{kind}"
    match = _PARAM_KEY.match(key)
    if match and match.group(1) in _TOP_LEVEL:
        return f"{_TOP_LEVEL[match.group(1)]}.{match.group(2)}"
    return None


def load_original_checkpoint(path) -> dict[str, torch.Tensor]:
    """Read the released pickle (weights_only) and return its tensors with prefixes stripped.

    A nested {"state_dict": ...} / {"module": ...} / {"model": {...}} wrapper is unwrapped. When
    both `model.` and `model_ema.` copies exist, the EMA weights (the inference weights) win.
    Non-tensor entries (optimizer, step counters) are dropped here.
    """
    path = Path(path)
    if not path.is_file():
        raise LIVEditorError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise LIVEditorError(f"checkpoint {path} is empty")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # mmap needs the zip format; retry without it for legacy pickles
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # the unpickler raises many types on foreign files
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise LIVEditorError(f"cannot load checkpoint {path} as a weights-only torch file: {reason}") from exc
    if not isinstance(obj, dict):
        raise LIVEditorError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    for wrapper in ("state_dict", "module", "model_ema", "model"):
        inner = obj.get(wrapper)
        if isinstance(inner, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            obj = inner
            break

    weights: dict[str, torch.Tensor] = {}
    from_ema: set[str] = set()
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        stripped, is_ema = key, False
        for prefix in CHECKPOINT_PREFIXES:
            if stripped.startswith(prefix):
                is_ema = prefix == "model_ema."
                stripped = stripped[len(prefix):]
                break
        if stripped in weights and not is_ema and stripped in from_ema:
            continue
        weights[stripped] = value
        if is_ema:
            from_ema.add(stripped)
    if not weights:
        raise LIVEditorError(f"checkpoint {path} contains no tensors")
    return weights


def map_original_state_dict(weights: dict[str, torch.Tensor]):
    """Rename original-layout weights. Returns (mapped, ignored, unknown) where `ignored` are the
    known unused and non-model keys and `unknown` the keys with no place in the model."""
    mapped, ignored, unknown = {}, [], []
    for key, value in weights.items():
        if key.startswith(NON_MODEL_PREFIXES) or any(p.match(key) for p in KNOWN_UNUSED):
            ignored.append(key)
            continue
        target = original_to_diffusers_key(key)
        if target is None:
            unknown.append(key)
        else:
            mapped[target] = value
    return mapped, sorted(ignored), sorted(unknown)


def infer_transformer_config(weights: dict[str, torch.Tensor], base_config: dict | None = None) -> dict:
    """LIVEditorTransformer3DModel config from weight shapes, with head count and eps from the base."""
    base_config = dict(base_config or {})
    try:
        patch = weights["patch_embedding.weight"]
        dim, in_channels = patch.shape[:2]
        patch_size = tuple(patch.shape[2:])
        head = weights["head.head.weight"]
        num_layers = 1 + max(int(m.group(1)) for k in weights if (m := re.match(r"^blocks\.(\d+)\.", k)))
        ffn_dim = weights["blocks.0.ffn.0.weight"].shape[0]
        text_dim = weights["text_embedding.0.weight"].shape[1]
        freq_dim = weights["time_embedding.0.weight"].shape[1]
    except (KeyError, ValueError) as exc:
        raise LIVEditorError(f"checkpoint is not a Wan/LIVEditor transformer: missing {exc}") from exc
    heads = int(base_config.get("num_attention_heads") or max(1, dim // 128))
    if dim % heads:
        raise LIVEditorError(f"checkpoint width {dim} is not divisible by the base model's {heads} heads")
    out_channels = head.shape[0] // (patch_size[0] * patch_size[1] * patch_size[2])
    return dict(
        patch_size=patch_size,
        num_attention_heads=heads,
        attention_head_dim=dim // heads,
        in_channels=int(in_channels),
        out_channels=int(out_channels),
        text_dim=int(text_dim),
        freq_dim=int(freq_dim),
        ffn_dim=int(ffn_dim),
        num_layers=num_layers,
        cross_attn_norm="blocks.0.norm3.weight" in weights,
        qk_norm="rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in weights else None,
        eps=float(base_config.get("eps", 1e-6)),
        rope_max_seq_len=int(base_config.get("rope_max_seq_len", 1024)),
    )


def _list(keys, limit=12) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def build_transformer(weights: dict[str, torch.Tensor], base_config: dict | None = None, dtype=None):
    """A LIVEditorTransformer3DModel holding the checkpoint's weights; strict about every key."""
    from .transformer_liveditor import LIVEditorTransformer3DModel

    config = infer_transformer_config(weights, base_config)
    mapped, _, unknown = map_original_state_dict(weights)
    with torch.device("meta"):
        model = LIVEditorTransformer3DModel(**config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(unknown + sorted(set(mapped) - set(expected)))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_list(unexpected)}")
        raise LIVEditorError("checkpoint does not match the LIVEditor transformer; " + "; ".join(parts))
    wrong = [f"{k} {tuple(mapped[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if mapped[k].shape != v.shape]
    if wrong:
        raise LIVEditorError(f"checkpoint weights have the wrong shape: {_list(wrong, 6)}")
    keep_fp32 = set(model._keep_in_fp32_modules)
    state = {}
    for key, value in mapped.items():
        value = value.contiguous()
        cast = dtype is not None and value.is_floating_point() and not keep_fp32.intersection(key.split("."))
        state[key] = value.to(dtype) if cast else value
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (RoPE tables) were created on meta; rebuild them on the CPU.
    with torch.device("cpu"):
        rope = type(model.rope)(config["attention_head_dim"], config["patch_size"], config["rope_max_seq_len"])
    model.rope = rope
    return model.eval()


def _copy_component(base: Path, out: Path, name: str) -> None:
    """Copy a component folder; re-save it as safetensors when it holds pickled weights."""
    src = base / name
    if not src.is_dir():
        raise LIVEditorError(f"base folder {base} lacks the {name} component")
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


def convert_checkpoint(checkpoint, base, out, dtype: torch.dtype | None = None, resolution_buckets=None) -> Path:
    """Write a complete LIVEditor pipeline folder at `out` (which must not exist yet).

    Args:
        checkpoint: the released `liveditor_ckpt.bin` (or any original-layout state dict file).
        base: a Wan2.2-T2V-A14B diffusers folder (tokenizer/, text_encoder/, vae/, transformer/config.json).
        out: the new folder; written under a temporary name next to it and renamed at the end.
        dtype: cast the transformer's floating weights (None: keep the checkpoint's dtype).
        resolution_buckets: the pipeline's buckets (default: the 14B model's).
    """
    from ..pipelines.pipeline_liveditor import LIVEDITOR_14B_BUCKETS, LIVEditorPipeline, flow_unipc_scheduler

    base, out = Path(base), Path(out)
    if not base.is_dir():
        raise LIVEditorError(f"base folder {base} does not exist")
    if out.exists():
        raise LIVEditorError(f"output folder {out} already exists; choose a new path")
    if not out.parent.is_dir():
        raise LIVEditorError(f"output's parent folder {out.parent} does not exist")
    base_config = {}
    config_file = base / "transformer" / "config.json"
    if config_file.is_file():
        base_config = json.loads(config_file.read_text())

    weights = load_original_checkpoint(checkpoint)
    transformer = build_transformer(weights, base_config, dtype)
    del weights

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name in ("tokenizer", "text_encoder", "vae"):
            _copy_component(base, tmp, name)
        transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        flow_unipc_scheduler().save_pretrained(tmp / "scheduler")
        index = {
            "_class_name": LIVEditorPipeline.__name__,
            "_diffusers_version": _diffusers_version(),
            "fps": 16.0,
            "max_num_frames": 81,
            "max_sequence_length": 512,
            "resolution_buckets": [list(hw) for hw in (resolution_buckets or LIVEDITOR_14B_BUCKETS)],
            "scheduler": ["diffusers", "UniPCMultistepScheduler"],
            "text_encoder": _library_and_class(base, "text_encoder"),
            "tokenizer": _library_and_class(base, "tokenizer"),
            "transformer": [type(transformer).__module__, type(transformer).__name__],
            "vae": ["diffusers", "AutoencoderKLWan"],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _library_and_class(base: Path, name: str) -> list[str]:
    """The (library, class) of a base component, from its model_index.json or its own config."""
    index_file = base / "model_index.json"
    if index_file.is_file():
        entry = json.loads(index_file.read_text()).get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[0]:
            return entry
    if name == "tokenizer":
        return ["transformers", "AutoTokenizer"]
    return ["transformers", "UMT5EncoderModel"]
