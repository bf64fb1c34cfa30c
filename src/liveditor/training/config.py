"""Training configuration: nested dataclasses loaded from a TOML, YAML or JSON file.

Every key is checked: an unknown key or a value of the wrong type is reported with its dotted
name (`optim.lr`), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LIVEditorError
from ..isa import ISAConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib


class ConfigError(LIVEditorError):
    """A training config that cannot be used; the message names the offending key."""


@dataclass
class ModelSection:
    """The LIVEditorTransformer3DModel architecture (channels come from the codec and text encoder)."""

    num_layers: int = 8
    num_attention_heads: int = 4
    attention_head_dim: int = 64
    ffn_dim: int = 1024
    freq_dim: int = 128
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    attention: str = "isa"  # "isa" or "dense" in the training loop
    isa: dict[str, Any] = field(default_factory=dict)  # ISAConfig fields; empty = the paper's defaults
    absolute_position_embedding: bool = False  # see LIVEditorTransformer3DModel


@dataclass
class CodecSection:
    """The lossless space-to-depth codec that stands in for the Wan VAE."""

    scale_factor_spatial: int = 4
    scale_factor_temporal: int = 1
    stats_clips: int = 64  # training clips used to estimate latents_mean / latents_std


@dataclass
class TextSection:
    """The domain text encoder (word tokenizer + small umT5), trained jointly with the transformer."""

    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 256
    max_length: int = 24  # tokens per instruction (the pipeline's max_sequence_length)
    drop_prob: float = 0.1  # instruction replaced by "" this often, so classifier-free guidance works


@dataclass
class DataSection:
    """Where training clips come from: "procedural" (ShapeEdit generated on the fly) or a shard
    folder / glob written by `liveditor.data.shards`.

    Procedural clips are an endless stream: the clip seeds come from
    `liveditor.data.shapes_batch.example_seeds(train.seed, stage, batch, batch_size, process, processes)`,
    so processes never share clips, a resumed run continues the stream and a new stage
    (`train.init_from`) never replays an earlier one. Keep batch_size and the number of processes
    fixed within a stage."""

    source: str = "procedural"
    renderer: str = "reference"  # procedural clips: "reference" (liveditor.data.shapes, one clip at a time
    #                              in the loader workers) or "batch" (scenes drawn in the workers,
    #                              pixels rendered a batch at a time on the training device); same clips
    start_seed: int = 0  # procedural: the first codec.stats_clips seeds estimate the latent statistics
    frames: int = 16
    height: int = 64
    width: int = 64
    num_workers: int = 2
    family_weights: list[int] = field(default_factory=lambda: [1, 1, 1, 1, 1, 1])  # procedural clips: share
    #              of swap, recolor, add, remove, background, motion (ShapeEditConfig.family_weights)
    motion_weights: list[int] = field(default_factory=lambda: [1, 1, 1, 1, 1, 1, 1])  # share of each kind of
    #              motion edit: reverse, stop, faster, left, right, up, down (ShapeEditConfig.motion_weights)


@dataclass
class OptimSection:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at the end of training
    grad_clip: float = 1.0


@dataclass
class TrainSection:
    batch_size: int = 32  # per process
    grad_accum_steps: int = 1
    max_steps: int = 10_000
    max_time_s: float = 0.0  # > 0: also stop after this much training time (the LR schedule follows
    #                           whichever limit is nearer)
    mixed_precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp16" or "no"
    gradient_checkpointing: bool = False
    ema_decay: float = 0.995  # 0.999 suits long runs (tens of thousands of steps)
    edit_loss_weight: float = 0.0  # > 0: the loss of latent positions whose pixels differ between input
    #                                and target (dilated by edit_dilation pixels) counts 1 + this much
    edit_dilation: int = 2
    compile: bool = False  # torch.compile each transformer block (regional; GPU training)
    cuda_graphs: bool = False  # with compile, on CUDA: replay the compiled blocks as CUDA graphs
    #                            (torch.compile's "reduce-overhead"), so issuing a step costs the
    #                            host a fraction of the kernels' launch time
    dense_fraction: float = 0.0  # with model.attention = "isa": this share of the steps (chosen by a
    #                              hash of seed, stage and step) trains dense attention instead, so the
    #                              weights serve both modes
    flow_shift: float = 3.0  # Wan's shifted timestep sampling: t = s*u / (1 + (s-1)*u)
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 500  # steps; a checkpoint is also written at the end
    output_dir: str = "runs/tiny-shapeedit"
    init_from: str = ""  # a LIVEditorPipeline folder whose weights (and codec statistics) start a
    #                      new stage; its architecture must match this config. Ignored on resume.
    schedule: str = "new"  # with init_from: "new" (fresh warmup and decay over max_steps) or
    #                        "continue" (the step count and decay go on from the folder's last stage;
    #                        the fresh optimizer still warms up over optim.warmup_steps)
    session_time_s: float = 0.0  # > 0: this invocation stops after this much wall time with a
    #                              checkpoint (and export); run again to resume
    val_every: int = 0  # > 0: score the EMA weights on the ShapeEdit val split every this many steps
    val_per_family: int = 10  # val clips per edit family


@dataclass
class ExportSection:
    """The pipeline folder written from the EMA weights when training ends."""

    pipeline_dir: str = ""  # empty: <output_dir>/pipeline
    dtype: str = "float16"  # weights on disk: "float16", "bfloat16" or "float32"
    flow_shift: float = 3.0  # the UniPC scheduler's shift at inference
    fps: float = 8.0
    num_inference_steps: int = 16  # the pipeline folder's sampling defaults
    guidance_scale: float = 1.0


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    codec: CodecSection = field(default_factory=CodecSection)
    text: TextSection = field(default_factory=TextSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    export: ExportSection = field(default_factory=ExportSection)

    def validate(self) -> "TrainConfig":
        """Check value ranges; raises ConfigError naming the key."""
        positive_ints = {
            "model.num_layers": self.model.num_layers,
            "model.num_attention_heads": self.model.num_attention_heads,
            "model.attention_head_dim": self.model.attention_head_dim,
            "model.ffn_dim": self.model.ffn_dim,
            "model.freq_dim": self.model.freq_dim,
            "codec.stats_clips": self.codec.stats_clips,
            "text.d_model": self.text.d_model,
            "text.num_layers": self.text.num_layers,
            "text.num_heads": self.text.num_heads,
            "text.d_ff": self.text.d_ff,
            "text.max_length": self.text.max_length,
            "data.frames": self.data.frames,
            "data.height": self.data.height,
            "data.width": self.data.width,
            "train.batch_size": self.train.batch_size,
            "train.grad_accum_steps": self.train.grad_accum_steps,
            "train.max_steps": self.train.max_steps,
            "train.log_every": self.train.log_every,
            "train.checkpoint_every": self.train.checkpoint_every,
        }
        for key, value in positive_ints.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        for key, value in {"data.start_seed": self.data.start_seed, "data.num_workers": self.data.num_workers,
                           "optim.warmup_steps": self.optim.warmup_steps, "train.seed": self.train.seed,
                           "train.edit_dilation": self.train.edit_dilation, "train.val_every": self.train.val_every,
                           "train.edit_loss_weight": self.train.edit_loss_weight,
                           "train.session_time_s": self.train.session_time_s}.items():
            if value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value}")
        if self.model.attention_head_dim % 2:
            raise ConfigError(f"model.attention_head_dim must be even (3D RoPE), got {self.model.attention_head_dim}")
        if len(self.model.patch_size) != 3 or min(self.model.patch_size) < 1:
            raise ConfigError(f"model.patch_size must be three positive ints, got {self.model.patch_size}")
        if self.model.attention not in ("isa", "dense"):
            raise ConfigError(f'model.attention must be "isa" or "dense", got {self.model.attention!r}')
        try:
            ISAConfig(**self.model.isa)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model.isa: {exc}") from None
        for key, value in (("codec.scale_factor_spatial", self.codec.scale_factor_spatial),
                           ("codec.scale_factor_temporal", self.codec.scale_factor_temporal)):
            if value < 1 or value & (value - 1):
                raise ConfigError(f"{key} must be a power of two, got {value}")
        s, st = self.codec.scale_factor_spatial, self.codec.scale_factor_temporal
        p_t, p_h, p_w = self.model.patch_size
        if self.data.frames % (st * p_t) or self.data.height % (s * p_h) or self.data.width % (s * p_w):
            raise ConfigError(
                f"data.frames/height/width = {self.data.frames}/{self.data.height}/{self.data.width} must be divisible "
                f"by codec scale x model.patch_size = {st * p_t}/{s * p_h}/{s * p_w}"
            )
        if self.text.d_model % self.text.num_heads:
            raise ConfigError(f"text.d_model={self.text.d_model} must be divisible by text.num_heads={self.text.num_heads}")
        if not 0.0 <= self.text.drop_prob < 1.0:
            raise ConfigError(f"text.drop_prob must be in [0, 1), got {self.text.drop_prob}")
        if not self.optim.lr > 0 or not math.isfinite(self.optim.lr):
            raise ConfigError(f"optim.lr must be a positive number, got {self.optim.lr}")
        if len(self.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.optim.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.optim.betas}")
        if self.optim.weight_decay < 0 or self.optim.eps <= 0:
            raise ConfigError("optim.weight_decay must be >= 0 and optim.eps > 0")
        if not 0.0 <= self.optim.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.optim.min_lr_ratio}")
        if not self.optim.grad_clip >= 0:
            raise ConfigError(f"optim.grad_clip must be >= 0 (0 disables), got {self.optim.grad_clip}")
        if self.train.max_time_s < 0:
            raise ConfigError(f"train.max_time_s must be >= 0 (0: no time limit), got {self.train.max_time_s}")
        from ..data.shapes import ShapeEditConfig

        for name in ("family_weights", "motion_weights"):
            try:
                ShapeEditConfig(**{name: tuple(getattr(self.data, name))})
            except LIVEditorError as exc:
                raise ConfigError(f"data.{name}: {exc}") from None
        if self.data.renderer not in ("reference", "batch"):
            raise ConfigError(f'data.renderer must be "reference" or "batch", got {self.data.renderer!r}')
        if self.train.seed >= 2**16:
            raise ConfigError(f"train.seed must be < 65536 (it names the run's clip stream), got {self.train.seed}")
        if self.train.schedule not in ("new", "continue"):
            raise ConfigError(f'train.schedule must be "new" or "continue", got {self.train.schedule!r}')
        if self.train.val_per_family < 1:
            raise ConfigError(f"train.val_per_family must be >= 1, got {self.train.val_per_family}")
        if self.train.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            raise ConfigError(f'train.mixed_precision must be "auto", "bf16", "fp16" or "no", got {self.train.mixed_precision!r}')
        if not 0.0 <= self.train.dense_fraction <= 1.0:
            raise ConfigError(f"train.dense_fraction must be in [0, 1], got {self.train.dense_fraction}")
        if not 0.0 <= self.train.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.train.ema_decay}")
        for key, value in (("train.flow_shift", self.train.flow_shift), ("export.flow_shift", self.export.flow_shift),
                           ("export.fps", self.export.fps)):
            if not value > 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if self.export.dtype not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f'export.dtype must be "float16", "bfloat16" or "float32", got {self.export.dtype!r}')
        if not self.train.output_dir:
            raise ConfigError("train.output_dir must not be empty")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading


def _read_file(path: Path) -> dict:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".toml":
            return tomllib.loads(text)
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
            return {} if data is None else data
        if suffix == ".json":
            return json.loads(text)
    except Exception as exc:  # parser errors differ per format; all mean "not a valid file"
        raise ConfigError(f"cannot parse {path}: {exc}") from None
    raise ConfigError(f"unsupported config format {suffix!r} for {path}; use .toml, .yaml/.yml or .json")


def _convert(value, annotation, key: str):
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table/mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")  # a bug in this module


def _build(cls, data, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'the config'} must be a table/mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f"; known keys{' in ' + prefix if prefix else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value, key)
        else:
            kwargs[name] = _convert(value, annotation, key)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be section.key (e.g. optim.lr)")
    try:  # TOML value syntax: 3e-4, true, "text", [1, 2, 2]
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word is a string
    return parts, value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a training config (TOML/YAML/JSON; missing keys take defaults), apply `section.key=value`
    overrides and validate. Raises ConfigError naming the offending key."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"training config not found: {path}")
        data = _read_file(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a table/mapping at the top level")
    for item in overrides or []:
        parts, value = _parse_override(item)
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return _build(TrainConfig, data, "").validate()
