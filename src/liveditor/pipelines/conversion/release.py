"""The released LIVEditor checkpoint (`liveditor_ckpt.bin`) read as the release reads it, and its
weights placed in `LIVEditorTransformer3DModel`.

The layouts the release's own loader accepts (spec section 3, facts of its public code), all
accepted here:
- a torch pickle, optionally wrapped in a top-level `state_dict`, `module` or `weights` entry (the
  first of these present is unwrapped, once);
- `wanx_unimodel.guidance_model.feedforward_model.` removed wherever it appears in a key;
- keys starting with `vae.` or containing `optimizer` / `scheduler` skipped (a `vae.` key under a
  `model.` prefix is ignored by the release's non-strict load; here it is skipped too);
- `.weight.lora` renamed to `.lora.`;
- one leading `model.` or `model_ema.` removed, so prefixes stack (`model_ema.wanx_unimodel...`);
  when several entries end up with one name, the one that comes last in the file wins.
The release then loads non-strictly into the original Wan model. Here the load is strict: the
known-unused weights (`self_attn.alpha_2`, `cross_attn.alpha_{1,2}`, present in every block) are
dropped by name and counted, a missing weight or a wrong shape is an error, and any other unknown
key is an error unless `ignore_unknown_keys` (the release would ignore it silently).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import LIVEditorError
from ...models.transformer_liveditor import RELEASE_ISA_CONFIG, LIVEditorTransformer3DModel
from .strict import check_weights, first_line

RELEASE_PREFIX = "wanx_unimodel.guidance_model.feedforward_model."
WRAPPER_KEYS = ("state_dict", "module", "weights")
COPY_PREFIXES = ("model.", "model_ema.")
# Which copy of a weight to take when the file holds several (e.g. `model.` and `model_ema.`):
# "last" is the release's rule (the one that comes last in the file); the others name a prefix.
COPY_CHOICES = ("last", "model", "model_ema")
# Present in every block of the release and never used by its forward: `alpha_2` of the
# self-attention, and both alphas of the cross-attention (its class inherits the self-attention's
# constructor). Only `self_attn.alpha_1` (the coarse-residual gate) is used.
UNUSED_WEIGHT = re.compile(r"^blocks\.\d+\.(self_attn\.alpha_2|cross_attn\.alpha_[12])\.weight$")
UNUSED_NAMES = "self_attn.alpha_2, cross_attn.alpha_1/2"
# Wan's head width in every released size; the checkpoint itself does not record the head count.
WAN_HEAD_DIM = 128


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
    # Original Wan's cross-attention norm is norm3 (diffusers: norm2); its norm2 and diffusers'
    # norm3 (before the FFN) have no weights.
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_BLOCK_MODULATION = re.compile(r"^blocks\.(\d+)\.modulation$")
_PARAM_KEY = re.compile(r"^(.+)\.(weight|bias)$")


@dataclass
class ReleaseCheckpoint:
    """The entries of a release checkpoint under their original Wan names, one copy each."""

    entries: dict[str, object]
    num_raw: int  # entries in the file (after unwrapping)
    skipped: int  # `vae.*`, optimizer and scheduler entries
    prefer: str = "last"
    # For names present in several copies: how many times each prefix's copy was taken.
    copies_taken: Counter = field(default_factory=Counter)

    def copies_summary(self) -> str:
        """One clause saying which copy was taken where a weight came in several, or ''."""
        if not self.copies_taken:
            return ""
        total = sum(self.copies_taken.values())
        taken = ", ".join(f"{_prefix_name(p)} for {n}" for p, n in self.copies_taken.most_common())
        rule = ("the later one in the file, as the release does" if self.prefer == "last"
                else f"--prefer {self.prefer}")
        return f"{total} weights came in several copies: took {taken} ({rule})"


def _prefix_name(prefix: str) -> str:
    return prefix if prefix else "the unprefixed copy"


def read_checkpoint_file(path, what: str = "checkpoint") -> dict:
    """A weights file as a dict: a torch pickle (loaded weights-only, memory-mapped when its
    format allows) or a safetensors file. One-line errors (naming it `what`) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise LIVEditorError(f"{what} {path} does not exist")
    if path.stat().st_size == 0:
        raise LIVEditorError(f"{what} {path} is empty")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types on foreign files
            raise LIVEditorError(f"cannot read {what} {path} as safetensors: {first_line(exc)}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # mmap needs the zip format; retry without it for legacy pickles
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # the unpickler raises many types on foreign files
            raise LIVEditorError(f"cannot load {what} {path} as a weights-only torch file: {first_line(exc)}") from exc
    if not isinstance(obj, dict):
        raise LIVEditorError(f"{what} {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def is_skipped_entry(key: str) -> bool:
    """The release's loader skips these: the VAE copy, optimizer and scheduler state."""
    return key.startswith("vae.") or "optimizer" in key or "scheduler" in key


def release_entries(obj: dict, prefer: str = "last") -> ReleaseCheckpoint:
    """Unwrap and rename a loaded checkpoint dict as the release's loader does (module docstring)."""
    if prefer not in COPY_CHOICES:
        raise ValueError(f"prefer must be one of {COPY_CHOICES}, got {prefer!r}")
    for wrapper in WRAPPER_KEYS:
        if wrapper in obj:
            obj = obj[wrapper]
            if not isinstance(obj, dict):
                raise LIVEditorError(f"checkpoint entry {wrapper!r} holds a {type(obj).__name__}, not a state dict")
            break
    copies: dict[str, list[tuple[str, object]]] = {}
    skipped = 0
    for raw_key, value in obj.items():
        key = str(raw_key).replace(RELEASE_PREFIX, "")
        if is_skipped_entry(key):
            skipped += 1
            continue
        key = key.replace(".weight.lora", ".lora.")
        prefix = next((p for p in COPY_PREFIXES if key.startswith(p)), "")
        key = key[len(prefix):]
        if key.startswith("vae."):  # a VAE copy under model./model_ema.: not the transformer's either
            skipped += 1
            continue
        copies.setdefault(key, []).append((prefix, value))

    entries: dict[str, object] = {}
    taken: Counter = Counter()
    for key, found in copies.items():
        prefix, value = found[-1]
        if len(found) > 1:
            if prefer != "last":
                preferred = [c for c in found if c[0] == prefer + "."]
                prefix, value = preferred[-1] if preferred else found[-1]
            taken[prefix] += 1
        entries[key] = value
    if not entries:
        raise LIVEditorError("checkpoint holds no model weights")
    return ReleaseCheckpoint(entries=entries, num_raw=len(obj), skipped=skipped, prefer=prefer, copies_taken=taken)


def load_release_checkpoint(path, prefer: str = "last") -> ReleaseCheckpoint:
    """Read `liveditor_ckpt.bin` (or any file in a layout the release accepts)."""
    return release_entries(read_checkpoint_file(path), prefer)


def release_to_model_key(key: str) -> str | None:
    """The LIVEditorTransformer3DModel name of an original-Wan key, or None if it has none."""
    if key == "head.modulation":
        return "scale_shift_table"
    match = _BLOCK_MODULATION.match(key)
    if match:
        return f"blocks.{match.group(1)}.scale_shift_table"
    match = _BLOCK_KEY.match(key)
    if match:
        index, module, kind = match.groups()
        target = _BLOCK_LEVEL.get(module)
        return None if target is None else f"blocks.{index}.{target}.{kind}"
    match = _PARAM_KEY.match(key)
    if match and match.group(1) in _TOP_LEVEL:
        return f"{_TOP_LEVEL[match.group(1)]}.{match.group(2)}"
    return None


def map_release_weights(entries: dict[str, object]) -> tuple[dict[str, object], list[str], list[str]]:
    """(mapped, unused, unknown): entries renamed for the model, the known-unused names, and the
    names with no place in the model."""
    mapped, unused, unknown = {}, [], []
    for key, value in entries.items():
        if UNUSED_WEIGHT.match(key):
            unused.append(key)
            continue
        target = release_to_model_key(key)
        if target is None:
            unknown.append(key)
        else:
            mapped[target] = value
    return mapped, unused, unknown


def infer_transformer_config(entries: dict[str, object], num_heads: int | None = None) -> dict:
    """LIVEditorTransformer3DModel config from the weight shapes. `num_heads`: from the base model's
    config; default: the width over Wan's head width of 128."""
    try:
        patch = entries["patch_embedding.weight"]
        dim, in_channels = patch.shape[:2]
        patch_size = tuple(int(s) for s in patch.shape[2:])
        head = entries["head.head.weight"]
        layers = [int(m.group(1)) for k in entries if (m := re.match(r"^blocks\.(\d+)\.", k))]
        num_layers = 1 + max(layers, default=-1)
        ffn_dim = entries["blocks.0.ffn.0.weight"].shape[0]
        text_dim = entries["text_embedding.0.weight"].shape[1]
        freq_dim = entries["time_embedding.0.weight"].shape[1]
    except KeyError as exc:
        raise LIVEditorError(f"checkpoint is not a Wan/LIVEditor transformer: it has no {exc.args[0]}") from exc
    except (AttributeError, ValueError) as exc:
        raise LIVEditorError(f"checkpoint is not a Wan/LIVEditor transformer: {exc}") from exc
    if len(patch_size) != 3:
        raise LIVEditorError(
            f"checkpoint's patch_embedding.weight has shape {tuple(patch.shape)}, not a 3D convolution's")
    if num_heads is None:
        if dim % WAN_HEAD_DIM:
            raise LIVEditorError(f"checkpoint width {dim} is not a multiple of Wan's head width {WAN_HEAD_DIM}; "
                                 "the base folder must give the head count")
        num_heads = dim // WAN_HEAD_DIM
    if dim % num_heads:
        raise LIVEditorError(f"checkpoint width {dim} is not divisible by the base model's {num_heads} heads")
    return dict(
        patch_size=patch_size,
        num_attention_heads=int(num_heads),
        attention_head_dim=int(dim // num_heads),
        in_channels=int(in_channels),
        out_channels=int(head.shape[0] // (patch_size[0] * patch_size[1] * patch_size[2])),
        text_dim=int(text_dim),
        freq_dim=int(freq_dim),
        ffn_dim=int(ffn_dim),
        num_layers=num_layers,
        cross_attn_norm="blocks.0.norm3.weight" in entries,
        qk_norm="rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in entries else None,
        eps=1e-6,
        rope_max_seq_len=1024,
        attention="isa",
        isa_config=dict(RELEASE_ISA_CONFIG),
    )


@dataclass
class TransformerReport:
    loaded: int  # weights placed in the model
    parameters: int
    unused: int  # known-unused weights dropped by name
    ignored_unknown: list[str]  # unknown keys dropped under ignore_unknown_keys


def build_transformer(checkpoint: ReleaseCheckpoint, num_heads: int | None = None, dtype: torch.dtype | None = None,
                      ignore_unknown_keys: bool = False):
    """(LIVEditorTransformer3DModel holding the checkpoint's weights, TransformerReport).

    Strict about every key (module docstring). `dtype` casts the floating weights except the
    modules the model keeps in fp32; None keeps the checkpoint's dtype. Weights are assigned, not
    copied, so a memory-mapped checkpoint is read only once, when saved.
    """
    entries = checkpoint.entries
    config = infer_transformer_config(entries, num_heads)
    mapped, unused, unknown = map_release_weights(entries)
    with torch.device("meta"):
        model = LIVEditorTransformer3DModel(**config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    lora = [k for k in unknown if ".lora." in k]
    hint = " (LoRA entries: the release's model has no LoRA layers and ignores them too)" if lora else ""
    check_weights("checkpoint", expected, mapped, unknown, ignore_unknown_keys, hint)
    keep_fp32 = set(model._keep_in_fp32_modules)
    state = {}
    for key, value in mapped.items():
        value = value.contiguous()
        cast = dtype is not None and value.is_floating_point() and not keep_fp32.intersection(key.split("."))
        state[key] = value.to(dtype) if cast else value
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (RoPE tables) were created on meta; rebuild them on the CPU.
    with torch.device("cpu"):
        model.rope = type(model.rope)(config["attention_head_dim"], config["patch_size"], config["rope_max_seq_len"])
    report = TransformerReport(loaded=len(state), parameters=sum(v.numel() for v in state.values()),
                               unused=len(unused), ignored_unknown=sorted(unknown))
    return model.eval(), report
