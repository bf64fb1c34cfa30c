"""The training loop: flow matching on ShapeEdit edit pairs, built on accelerate.

The same loop trains the tiny bundled model on one GPU (or a CPU) and runs multi-GPU under
`accelerate launch -m liveditor.cli train --config FILE`: each process reads its own slice of the
data, accelerate averages the gradients.

What one step does: encode the input and target videos with the codec (the input becomes the
clean context latent, the target the x0 of flow matching), embed the instruction (dropped to ""
with probability `text.drop_prob`, so classifier-free guidance works at inference), draw shifted
noise levels, and regress the transformer's output on the velocity noise - x0. AdamW with warmup
and cosine decay, gradient clipping, an EMA of the weights, bf16 autocast on GPU.

Checkpoints (model, text encoder, optimizer, EMA, step, elapsed time, every process's RNG) are
written to a temporary folder and renamed into place, so an interrupted run always leaves the last
complete checkpoint; `train()` resumes from it. At the end the EMA weights are exported as a
`LIVEditorPipeline` folder.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from ..atomic import old_copy, publish_directory
from ..errors import LIVEditorError
from ..pipelines.acceleration import compile_transformer
from ..pipelines.pipeline_liveditor import encode_instructions
from .config import TrainConfig
from .ema import EMA
from .flow import NUM_TRAIN_TIMESTEPS, flow_matching_loss, flow_matching_pair, shift_sigmas

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer_state.json"
LOG_FILE = "train_log.jsonl"
TRAINING_SUMMARY = "training.json"


def _null_prompts() -> tuple[str, ...]:
    from ..pipelines.pipeline_liveditor import WAN_NEGATIVE_PROMPT

    return ("", WAN_NEGATIVE_PROMPT)


# What a dropped instruction becomes: the empty prompt or the pipeline's default negative prompt
# (for the word tokenizer that is "<unk> </s>"), so both work as the unconditional CFG branch.
NULL_PROMPTS = _null_prompts()


@dataclass
class TrainResult:
    steps: int
    samples: int
    train_time_s: float
    last_loss: float
    samples_per_s: float
    output_dir: Path
    pipeline_dir: Path | None


# ---------------------------------------------------------------------------------------------
# Components


def build_components(config: TrainConfig, latents_mean=None, latents_std=None):
    """Fresh (tokenizer, text_encoder, codec, transformer) with the config's architecture."""
    from ..models import LIVEditorTransformer3DModel
    from ..models.tiny_codec import SpaceToDepthVideoCodec
    from ..models.tiny_text import build_text_encoder, build_word_tokenizer

    tokenizer = build_word_tokenizer(model_max_length=config.text.max_length)
    text_encoder = build_text_encoder(
        len(tokenizer), config.text.d_model, config.text.num_layers, config.text.num_heads, config.text.d_ff
    )
    codec = SpaceToDepthVideoCodec(
        in_channels=3,
        scale_factor_spatial=config.codec.scale_factor_spatial,
        scale_factor_temporal=config.codec.scale_factor_temporal,
        latents_mean=latents_mean,
        latents_std=latents_std,
    )
    m = config.model
    transformer = LIVEditorTransformer3DModel(
        patch_size=tuple(m.patch_size),
        num_attention_heads=m.num_attention_heads,
        attention_head_dim=m.attention_head_dim,
        in_channels=codec.config.z_dim,
        out_channels=codec.config.z_dim,
        text_dim=config.text.d_model,
        freq_dim=m.freq_dim,
        ffn_dim=m.ffn_dim,
        num_layers=m.num_layers,
        attention=m.attention,
        isa_config=dict(m.isa) or None,
        absolute_position_embedding=m.absolute_position_embedding,
    )
    return tokenizer, text_encoder, codec, transformer


# ---------------------------------------------------------------------------------------------
# Data


def _shapeedit_config(config: TrainConfig):
    from ..data.shapes import ShapeEditConfig

    return ShapeEditConfig(frames=config.data.frames, height=config.data.height, width=config.data.width,
                           family_weights=tuple(config.data.family_weights),
                           motion_weights=tuple(config.data.motion_weights))


_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays: a bijection that scrambles every input bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_seeds(seed: int, stage: int, indices) -> np.ndarray:
    """Seeds (int64 in [0, 2**62)) of the noise level, noise and instruction drop of samples
    `indices` of one training stage (numbered over all processes, as `example_seeds` numbers clips).

    A hash of (seed, stage, index): runs and stages draw unrelated streams, and sample `i` gets the
    same seed however the stage was batched, accumulated, spread over processes or interrupted.
    (Which clip a sample is comes from `liveditor.data.shapes_batch.example_seeds`.)
    """
    with np.errstate(over="ignore"):
        key = np.uint64(0)
        for part in (seed, stage):
            key = _mix64(np.uint64((int(key) ^ (int(part) & _MASK64)) & _MASK64) + np.uint64(0x9E3779B97F4A7C15))
        index = np.asarray(indices, dtype=np.uint64)
        out = _mix64(key + index * np.uint64(0x9E3779B97F4A7C15))
    return (out >> np.uint64(2)).astype(np.int64)


def step_attention_mode(config: TrainConfig, stage: int, step: int) -> str:
    """The self-attention mode of optimizer step `step`: the model's, except that with
    `train.dense_fraction` > 0 an ISA model trains that share of its steps with dense attention
    (exact attention plus the gated residual). A hash of (seed, stage, step), so every process
    and a resumed run pick the same mode."""
    fraction = config.train.dense_fraction
    if config.model.attention == "dense" or fraction <= 0:
        return config.model.attention
    # sample_seeds' stream is shared with the samples; the step's draw lives far past any sample index.
    draw = int(sample_seeds(config.train.seed, stage, [2**61 + step])[0]) / 2**62
    return "dense" if draw < fraction else "isa"


# Length of the endless procedural stream: item i of ShapeEditDataset(ENDLESS) is the clip of seed i.
ENDLESS = 2**62


class ClipSeeds(Sampler):
    """Endless procedural clip seeds of one process: `example_seeds` of its batches from
    `start_batch` on (disjoint between runs, stages, processes and batches)."""

    def __init__(self, seed: int, stage: int, rank: int, world: int, batch_size: int, start_batch: int = 0):
        self.args = (seed, stage, rank, world, batch_size)
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[int]:
        from ..data.shapes_batch import example_seeds

        seed, stage, rank, world, batch_size = self.args
        batch_index = self.start_batch
        while True:
            yield from example_seeds(seed, stage, batch_index, batch_size, rank, world)
            batch_index += 1

    def __len__(self) -> int:  # endless; DataLoader only needs a number
        return ENDLESS



def video_batch_to_model(videos: torch.Tensor, device) -> torch.Tensor:
    """A batch of uint8 clips `[B, F, H, W, 3]` as the codec's input `[B, 3, F, H, W]` in [-1, 1]."""
    if videos.dtype != torch.uint8 or videos.dim() != 5 or videos.shape[-1] != 3:
        raise ValueError(f"expected uint8 clips [B, F, H, W, 3], got {videos.dtype} {tuple(videos.shape)}")
    videos = videos.to(device, non_blocking=True)
    return videos.permute(0, 4, 1, 2, 3).float().div_(127.5).sub_(1.0)


def _batches(config: TrainConfig, stage: int, rank: int, world: int, consumed: int, device: torch.device) -> Iterator[dict]:
    """Endless training batches for this process, starting after `consumed` of its samples."""
    pin_memory = device.type == "cuda"
    data = config.data
    common = dict(
        batch_size=config.train.batch_size,
        num_workers=data.num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        prefetch_factor=4 if data.num_workers > 0 else None,
        # Its own generator, so creating the loader does not draw from the global RNG.
        generator=torch.Generator().manual_seed(config.train.seed * 1009 + rank),
    )
    shape_config = _shapeedit_config(config)
    batch_size, seed = config.train.batch_size, config.train.seed
    if data.source == "procedural" and data.renderer == "batch":
        # Scenes drawn in the loader workers, pixels rendered in batches on this process's device.
        from ..data.shapes_batch import SceneBatchStream, ShapeEditBatchRenderer

        stream = SceneBatchStream(batch_size, seed, stage, rank, world, consumed // batch_size, config=shape_config)
        renderer = ShapeEditBatchRenderer(shape_config, device)
        loader_args = {k: v for k, v in common.items() if k not in ("batch_size", "drop_last", "pin_memory")}
        for scenes in DataLoader(stream, batch_size=None, persistent_workers=data.num_workers > 0, **loader_args):
            clips = renderer.render_scenes(scenes)
            yield {"source": clips.source, "target": clips.target, "instruction": clips.instructions}
        return
    if data.source == "procedural":
        from ..data.shards import ShapeEditDataset

        sampler = ClipSeeds(seed, stage, rank, world, batch_size, consumed // batch_size)
        yield from DataLoader(ShapeEditDataset(ENDLESS, "train", config=shape_config), sampler=sampler,
                              persistent_workers=data.num_workers > 0, **common)
        return

    from ..data.shards import ShapeEditShards, check_shard_coverage

    check_shard_coverage(data.source, world, data.num_workers)
    # Shard streams resume with a fresh shuffle (epoch = samples already consumed, folded with the
    # stage), not mid-shard.
    epoch = consumed + stage * 1_000_003
    while True:
        dataset = ShapeEditShards(data.source, shuffle=True, seed=config.train.seed, process_index=rank, num_processes=world)
        dataset.set_epoch(epoch)
        produced = 0
        for batch in DataLoader(dataset, **common):
            produced += 1
            yield batch
        if not produced:
            raise LIVEditorError(f"no usable training samples in {data.source} for process {rank}")
        epoch += 1


def estimate_latent_statistics(config: TrainConfig) -> tuple[list[float], list[float]]:
    """Per-channel latent mean/std over the first `codec.stats_clips` training clips (inputs and targets)."""
    from ..data.shards import example_to_tensors, iter_examples
    from ..data.shapes import generate_example
    from ..models.tiny_codec import SpaceToDepthVideoCodec, channel_statistics

    n = config.codec.stats_clips
    if config.data.source == "procedural":
        shape_config = _shapeedit_config(config)
        examples = (generate_example(config.data.start_seed + i, "train", config=shape_config) for i in range(n))
    else:
        examples = iter_examples(config.data.source)
    videos = []
    for example in examples:
        tensors = example_to_tensors(example)
        videos += [tensors["source"], tensors["target"]]
        if len(videos) >= 2 * n:
            break
    if not videos:
        raise LIVEditorError(f"no training clips found in {config.data.source}")
    codec = SpaceToDepthVideoCodec(
        scale_factor_spatial=config.codec.scale_factor_spatial, scale_factor_temporal=config.codec.scale_factor_temporal
    )
    return channel_statistics(video_batch_to_model(torch.stack(videos), "cpu"), codec)


# ---------------------------------------------------------------------------------------------
# Schedule and checkpoints


def learning_rate(config: TrainConfig, step: int, elapsed_s: float, stage_start_step: int = 0) -> float:
    """Linear warmup from the stage's first step (a stage starts with a fresh optimizer, also when
    it continues an earlier stage's schedule), then cosine decay to lr * min_lr_ratio over whichever
    limit (steps or time) is nearer."""
    o, t = config.optim, config.train
    warmup = min(1.0, (step - stage_start_step + 1) / o.warmup_steps) if o.warmup_steps else 1.0
    progress = step / t.max_steps
    if t.max_time_s > 0:
        progress = max(progress, elapsed_s / t.max_time_s)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return o.lr * warmup * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * cosine)


def find_checkpoint(output_dir: Path) -> Path | None:
    for path in (output_dir / CHECKPOINT_DIR, old_copy(output_dir / CHECKPOINT_DIR)):
        if (path / TRAINER_STATE).is_file():
            return path
    return None


def _save_checkpoint(accelerator, output_dir: Path, state: dict) -> None:
    tmp = output_dir / f".{CHECKPOINT_DIR}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
        publish_directory(tmp, output_dir / CHECKPOINT_DIR, replace=True)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------
# Export


def build_pipeline(config: TrainConfig, tokenizer, text_encoder, codec, transformer, ema: EMA | None,
                   dtype: torch.dtype):
    """A LIVEditorPipeline on the CPU from the modules' weights (EMA weights when `ema` is given).

    Fresh modules take the weights: the trained ones may carry accelerate's autocast wrapper and
    compiled blocks, which a deep copy would keep."""
    from ..pipelines.pipeline_liveditor import LIVEditorPipeline, flow_unipc_scheduler

    trained_text, trained_transformer = text_encoder, transformer
    _, text_encoder, _, transformer = build_components(config, list(codec.config.latents_mean),
                                                       list(codec.config.latents_std))
    text_encoder.load_state_dict({k: v.float().cpu() for k, v in trained_text.state_dict().items()})
    transformer.load_state_dict({k: v.float().cpu() for k, v in trained_transformer.state_dict().items()})
    if ema is not None:
        ema.copy_to({"text_encoder": text_encoder, "transformer": transformer})
    return LIVEditorPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.to(dtype),
        vae=copy.deepcopy(codec).cpu(),
        scheduler=flow_unipc_scheduler(config.export.flow_shift),
        transformer=transformer.to(dtype),
        resolution_buckets=[(config.data.height, config.data.width)],
        fps=config.export.fps,
        max_sequence_length=config.text.max_length,
        max_num_frames=config.data.frames,
        default_num_inference_steps=config.export.num_inference_steps,
        default_guidance_scale=config.export.guidance_scale,
    )


# Weight files of at most this size, so that each stays under 16 MB (diffusers reads the index).
MAX_SHARD_SIZE = "15MB"


def export_pipeline(config: TrainConfig, tokenizer, text_encoder, codec, transformer, ema: EMA | None,
                    pipeline_dir: Path, summary: dict) -> Path:
    """Write a LIVEditorPipeline folder (EMA weights when `ema` is given) atomically."""
    pipeline_dir = Path(pipeline_dir)
    if pipeline_dir.exists() and not (pipeline_dir / "model_index.json").is_file():
        raise LIVEditorError(f"{pipeline_dir} exists and is not a pipeline folder; refusing to replace it")
    pipeline = build_pipeline(config, tokenizer, text_encoder, codec, transformer, ema, getattr(torch, config.export.dtype))
    pipeline_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pipeline_dir.with_name(f".{pipeline_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipeline.save_pretrained(str(tmp), max_shard_size=MAX_SHARD_SIZE)
    (tmp / TRAINING_SUMMARY).write_text(json.dumps(summary, indent=2))
    publish_directory(tmp, pipeline_dir, replace=True)
    return pipeline_dir


def earlier_stages(pipeline_dir: Path) -> list[dict]:
    """The training stages recorded in a pipeline folder's training.json (oldest first)."""
    path = Path(pipeline_dir) / TRAINING_SUMMARY
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    if "stages" in record:
        return list(record["stages"])
    # Older folders: the last run at the top level, earlier ones under "previous_runs".
    last = {k: v for k, v in record.items() if k != "previous_runs"}
    return list(record.get("previous_runs", [])) + [last]


# ---------------------------------------------------------------------------------------------
# One optimizer step


def training_flops_per_clip(config: TrainConfig) -> float:
    """Model FLOPs of one training clip (forward + backward = 3x forward; dense self-attention
    counted in full, so ISA runs report dense-equivalent FLOP/s)."""
    m, c = config.model, config.codec
    grid = (config.data.frames // c.scale_factor_temporal // m.patch_size[0],
            config.data.height // c.scale_factor_spatial // m.patch_size[1],
            config.data.width // c.scale_factor_spatial // m.patch_size[2])
    segment = math.prod(grid)
    tokens = 2 * segment
    inner = m.num_attention_heads * m.attention_head_dim
    text = config.text.max_length
    patch = 3 * c.scale_factor_spatial**2 * c.scale_factor_temporal * math.prod(m.patch_size)
    per_layer = (tokens * (4 * inner * inner + 2 * inner * inner + 2 * inner * m.ffn_dim + inner)
                 + 2 * tokens * tokens * inner + 2 * tokens * text * inner + 2 * text * inner * inner)
    macs = m.num_layers * per_layer + tokens * patch * inner + segment * inner * patch
    return 3 * 2 * float(macs)


def edit_region_weights(source: torch.Tensor, target: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Loss weights `[B, 1, F', h, w]` on the latent grid: 1 + train.edit_loss_weight where any pixel
    of the latent cell differs between input and target (after dilating the differing pixels by
    train.edit_dilation), 1 elsewhere. `source`/`target`: uint8 `[B, F, H, W, 3]` on the device."""
    differs = (source != target).any(dim=-1).float()  # [B, F, H, W]
    d = config.train.edit_dilation
    if d:
        differs = torch.nn.functional.max_pool2d(differs, 2 * d + 1, stride=1, padding=d)
    s, st = config.codec.scale_factor_spatial, config.codec.scale_factor_temporal
    cells = torch.nn.functional.max_pool3d(differs[:, None], (st, s, s))
    return 1.0 + config.train.edit_loss_weight * cells


@dataclass
class SampleRandomness:
    """What flow matching draws for each sample, from that sample's own seed: noise level, noise and
    whether its instruction is dropped (and for which null prompt). Per-sample seeds make a batch of
    2 and two accumulated micro-batches of 1 identical, and a resumed run the same as an unbroken one."""

    sigmas: torch.Tensor  # [B]
    noise: torch.Tensor  # like x0
    prompts: list[str]


def sample_randomness(seeds, prompts: list[str], latent_shape, config: TrainConfig, device) -> SampleRandomness:
    generator = torch.Generator(device=device)
    u, noise = [], []
    for seed in seeds:
        generator.manual_seed(int(seed))
        u.append(torch.rand(1, generator=generator, device=device))
        noise.append(torch.randn(tuple(latent_shape), generator=generator, device=device))
    chosen = []
    for seed, prompt in zip(seeds, prompts):
        rng = np.random.default_rng(int(seed))
        drop, which = rng.random() < config.text.drop_prob, int(rng.integers(len(NULL_PROMPTS)))
        chosen.append(NULL_PROMPTS[which] if drop else prompt)
    return SampleRandomness(shift_sigmas(torch.cat(u), config.train.flow_shift), torch.stack(noise), chosen)


class TrainStep:
    """The optimizer step of the loop (also timed by benchmarks/bench_train.py): flow-matching loss
    on every micro-batch, accelerate's accumulation, gradient clipping, fused AdamW on CUDA, EMA.
    Nothing in it waits for the GPU: the loss stays on the device."""

    def __init__(self, config: TrainConfig, accelerator, tokenizer, text_encoder, codec, transformer):
        self.config, self.accelerator, self.tokenizer, self.codec = config, accelerator, tokenizer, codec
        device = accelerator.device
        if config.train.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        # CUDA graphs: without them the host took 244 ms to issue the tiny model's ISA step, close
        # to the GPU's 320 ms for it (one H100, docs/benchmarks.md).
        self.cuda_graphs = config.train.compile and config.train.cuda_graphs and device.type == "cuda"
        if config.train.compile:
            # Regional compilation: one graph per block type, reused by every layer. Reductions of up
            # to 16 elements are unrolled (Inductor's default: up to 7): ISA's means over 16-token blocks
            # then compile to pointwise kernels at 4.2 TB/s instead of reductions at 1.2 (4.9 ms less
            # kernel time in a 256-clip step, one H200; docs/benchmarks.md).
            compile_transformer(transformer, options={"triton.cudagraphs": self.cuda_graphs,
                                                      "unroll_reductions_threshold": 17})
        codec.to(device)
        self.ema = EMA({"text_encoder": text_encoder, "transformer": transformer}, config.train.ema_decay).to(device)
        optimizer = torch.optim.AdamW(
            _param_groups([transformer, text_encoder], config.optim.weight_decay),
            lr=config.optim.lr, betas=tuple(config.optim.betas), eps=config.optim.eps,
            fused=device.type == "cuda",
        )
        self.transformer, self.text_encoder, self.optimizer = accelerator.prepare(transformer, text_encoder, optimizer)
        accelerator.register_for_checkpointing(self.ema)
        self.params = list(self.transformer.parameters()) + list(self.text_encoder.parameters())

    def loss(self, batch: dict, seeds, mode: str | None = None) -> torch.Tensor:
        """The flow-matching loss of one micro-batch; `seeds`: one sample seed per clip; `mode`:
        the self-attention mode of this step (None: the model's)."""
        config, device = self.config, self.accelerator.device
        source_u8 = batch["source"].to(device, non_blocking=True)
        target_u8 = batch["target"].to(device, non_blocking=True)
        with torch.no_grad():
            context = self.codec.normalize(self.codec.encode(video_batch_to_model(source_u8, device)).latent_dist.mode())
            x0 = self.codec.normalize(self.codec.encode(video_batch_to_model(target_u8, device)).latent_dist.mode())
        draw = sample_randomness(seeds, list(batch["instruction"]), x0.shape[1:], config, device)
        text = encode_instructions(self.tokenizer, self.text_encoder, draw.prompts, config.text.max_length)
        x_t, velocity = flow_matching_pair(x0, draw.noise, draw.sigmas)
        attention_kwargs = {"mode": mode} if mode is not None else None
        prediction = self.transformer(x_t, draw.sigmas * NUM_TRAIN_TIMESTEPS, text, context,
                                      attention_kwargs=attention_kwargs, return_dict=False)[0]
        if config.train.edit_loss_weight > 0:
            weights = edit_region_weights(source_u8, target_u8, config)
            return torch.mean(weights * (prediction.float() - velocity.float()) ** 2)
        return flow_matching_loss(prediction, velocity)

    def __call__(self, micro_batches: list[tuple[dict, np.ndarray]], lr: float, mode: str | None = None) -> torch.Tensor:
        """One optimizer step over `micro_batches` [(batch, sample seeds)] with self-attention
        `mode` (None: the model's); returns the summed micro-batch losses (a device tensor)."""
        accelerator = self.accelerator
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = None
        for index, (batch, seeds) in enumerate(micro_batches):
            if self.cuda_graphs:
                # A new iteration: the graphs' outputs of the last one (already consumed by its
                # backward) may be overwritten.
                torch.compiler.cudagraph_mark_step_begin()
            with accelerator.accumulate(self.transformer, self.text_encoder):
                loss = self.loss(batch, seeds, mode)
                accelerator.backward(loss)
                if accelerator.sync_gradients and self.config.optim.grad_clip > 0:
                    accelerator.clip_grad_norm_(self.params, self.config.optim.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            if self.cuda_graphs and index < len(micro_batches) - 1:
                # Autograd kept the first gradients as the graphs' own output buffers, which the
                # next micro-batch's replay overwrites before it accumulates into them.
                for param in self.params:
                    if param.grad is not None:
                        param.grad = param.grad.clone()
            total = loss.detach() if total is None else total + loss.detach()
        self.ema.update({"text_encoder": accelerator.unwrap_model(self.text_encoder),
                         "transformer": accelerator.unwrap_model(self.transformer)})
        return total


# ---------------------------------------------------------------------------------------------
# The loop


class AgreedClock:
    """Training time and session time that every process agrees on.

    Each process measures its own. Time limits or a time-based learning rate read from each
    process's own clock would stop the processes at different steps (the others then wait forever
    in the next collective) and give them different learning rates. After every step the processes
    exchange their clocks over a CPU (gloo) group, which needs no GPU synchronisation, and all keep
    the largest."""

    def __init__(self, processes: int, train_time_s: float):
        self.group = dist.new_group(backend="gloo") if processes > 1 else None
        self.train_time_s = train_time_s
        self.session_s = 0.0

    def advance(self, step_s: float, session_s: float) -> None:
        """Add one step's time (this process's) and set the session time, then agree."""
        values = torch.tensor([self.train_time_s + step_s, session_s], dtype=torch.float64)
        if self.group is not None:
            dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        self.train_time_s, self.session_s = values.tolist()


def _param_groups(modules, weight_decay: float):
    """Weight decay on matrices only (not on norms, biases, embeddings' scale tables)."""
    decay, no_decay = [], []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def validate(config: TrainConfig, pipeline, device) -> dict:
    """Success per family on `train.val_per_family` ShapeEdit `val` clips, ISA and dense, with the
    pipeline folder's sampling defaults."""
    from ..data.shapes import ShapeEditConfig
    from ..eval.shapeedit import evaluate_shapeedit, pipeline_edit_fn

    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    result = evaluate_shapeedit(
        pipeline_edit_fn(pipeline, seed=0), per_family=config.train.val_per_family, split="val",
        config=ShapeEditConfig(frames=config.data.frames, height=config.data.height, width=config.data.width),
        progress=False,
    )
    return {family: {mode: round(entry[mode]["success_rate"], 1) for mode in ("isa", "dense")}
            for family, entry in result["summary"].items()}


def train(config: TrainConfig, resume: bool = True, progress: bool = True, export: bool = True) -> TrainResult:
    """Train (or continue training) the model the config describes; returns what was done.

    Under a launcher (torchrun, accelerate launch) the process group this call starts is ended
    before it returns; one the caller started is left to the caller."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    t_cfg = config.train
    mixed = t_cfg.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    starts_process_group = not (dist.is_available() and dist.is_initialized())
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=t_cfg.grad_accum_steps)
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    output_dir = Path(t_cfg.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    session_start = time.perf_counter()

    checkpoint = find_checkpoint(output_dir) if resume else None
    state = json.loads((checkpoint / TRAINER_STATE).read_text()) if checkpoint else {}
    init = None
    # What this stage started from is the checkpoint's, not the resuming command's: a command that
    # resumes on a machine which kept its checkpoint may name another folder as its fallback.
    init_from, schedule = t_cfg.init_from or None, t_cfg.schedule
    if state:
        latents_mean, latents_std = state["latents_mean"], state["latents_std"]
        stages, start_step = state.get("stages", []), int(state.get("start_step", 0))
        init_from, schedule = state.get("init_from", init_from), state.get("schedule", schedule)
    elif t_cfg.init_from:
        init = _load_init_pipeline(Path(t_cfg.init_from))
        latents_mean, latents_std = init["latents_mean"], init["latents_std"]
        stages = earlier_stages(Path(t_cfg.init_from))
        start_step = 0
        if t_cfg.schedule == "continue" and stages:
            start_step = int(stages[-1].get("global_step", stages[-1].get("steps", 0)))
    else:
        latents_mean, latents_std = estimate_latent_statistics(config)
        stages, start_step = [], 0
    stage = len(stages)  # folds into every seed: a new stage never replays an earlier one's data or noise

    set_seed(t_cfg.seed)  # same initial weights on every process
    tokenizer, text_encoder, codec, transformer = build_components(config, latents_mean, latents_std)
    if init is not None:
        _copy_weights(init["text_encoder"], text_encoder, "text_encoder", t_cfg.init_from)
        _copy_weights(init["transformer"], transformer, "transformer", t_cfg.init_from)
    step_fn = TrainStep(config, accelerator, tokenizer, text_encoder, codec, transformer)
    transformer, text_encoder, ema = step_fn.transformer, step_fn.text_encoder, step_fn.ema

    step = int(state.get("step", start_step))
    elapsed = float(state.get("train_time_s", 0.0))
    if checkpoint:
        accelerator.load_state(str(checkpoint))
        if accelerator.is_main_process:
            logger.info("resumed from %s at step %d", checkpoint, step)
            if t_cfg.init_from and t_cfg.init_from != init_from:
                logger.info("train.init_from=%s not used: the checkpoint's stage started from %s",
                            t_cfg.init_from, init_from)

    per_process_step = t_cfg.batch_size * t_cfg.grad_accum_steps
    samples_per_step = per_process_step * world
    consumed = (step - start_step) * per_process_step  # this process's samples so far in this stage
    batches = _batches(config, stage, rank, world, consumed, device)
    flops_per_clip = training_flops_per_clip(config)
    run_info = {
        "device": _device_name(device),
        "processes": world,
        "mixed_precision": mixed,
        "attention": config.model.attention,
        "isa_config": dict(config.model.isa),
        "compile": t_cfg.compile,
        "cuda_graphs": step_fn.cuda_graphs,
        "transformer_params": sum(p.numel() for p in accelerator.unwrap_model(transformer).parameters()),
        "text_encoder_params": sum(p.numel() for p in accelerator.unwrap_model(text_encoder).parameters()),
        "tokens_per_clip": 2 * math.prod(
            (config.data.frames // config.codec.scale_factor_temporal // config.model.patch_size[0],
             config.data.height // config.codec.scale_factor_spatial // config.model.patch_size[1],
             config.data.width // config.codec.scale_factor_spatial // config.model.patch_size[2])
        ),
        "training_gflop_per_clip": round(flops_per_clip / 1e9, 2),
        "stage": stage,
    }
    log_path = output_dir / LOG_FILE
    if accelerator.is_main_process:
        logger.info("training %s", json.dumps(run_info))
        with open(log_path, "a") as log:
            log.write(json.dumps({"event": "start", "step": step, **run_info, "config": config.to_dict()}) + "\n")

    clock = AgreedClock(world, elapsed)
    clock.advance(0.0, time.perf_counter() - session_start)

    def keep_going() -> bool:
        if t_cfg.max_time_s > 0 and clock.train_time_s >= t_cfg.max_time_s:
            return False
        return not (t_cfg.session_time_s > 0 and clock.session_s >= t_cfg.session_time_s)

    def stage_summary() -> dict:
        return {**run_info, "steps": step - start_step, "global_step": step,
                "samples": (step - start_step) * samples_per_step, "train_time_s": round(elapsed, 1),
                "last_loss": last_loss, "clips_per_s": round((step - start_step) * samples_per_step / max(elapsed, 1e-9), 2),
                "batch_size": samples_per_step, "init_from": init_from, "schedule": schedule,
                "ema_decay": t_cfg.ema_decay, "edit_loss_weight": t_cfg.edit_loss_weight,
                "dense_fraction": t_cfg.dense_fraction, "lr": config.optim.lr,
                "warmup_steps": config.optim.warmup_steps, "max_steps": t_cfg.max_steps,
                # the draw of clips changes between stages; without it a stage's record cannot say what it learned from
                "data_source": config.data.source, "family_weights": list(config.data.family_weights),
                "motion_weights": list(config.data.motion_weights),
                "validation": val_history[-1] if val_history else None}

    def trainer_state() -> dict:
        return {"step": step, "start_step": start_step, "samples": (step - start_step) * samples_per_step,
                "train_time_s": elapsed, "latents_mean": latents_mean, "latents_std": latents_std,
                "stages": stages, "val_history": val_history, "init_from": init_from, "schedule": schedule}

    bar = tqdm(total=t_cfg.max_steps, initial=step, desc="train", unit="step",
               disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    window_start, window_samples = time.perf_counter(), 0
    data_wait = 0.0  # seconds this window spent waiting for the data loader
    last_loss = float("nan")
    val_history = list(state.get("val_history", []))
    transformer.train()
    text_encoder.train()
    try:
        while step < t_cfg.max_steps and keep_going():
            step_start = time.perf_counter()
            micro_batches = []
            for micro in range(t_cfg.grad_accum_steps):
                wait_start = time.perf_counter()
                batch = next(batches)
                data_wait += time.perf_counter() - wait_start
                # The sample's place in the whole stage (all processes), numbered as example_seeds
                # numbers clips: N processes of batch b draw what one process of batch N*b would.
                first = ((consumed // t_cfg.batch_size + micro) * world + rank) * t_cfg.batch_size
                seeds = sample_seeds(t_cfg.seed, stage, range(first, first + t_cfg.batch_size))
                micro_batches.append((batch, seeds))
            lr = learning_rate(config, step, elapsed, start_step)
            loss_sum += step_fn(micro_batches, lr, step_attention_mode(config, stage, step))
            loss_count += t_cfg.grad_accum_steps
            consumed += per_process_step
            step += 1
            clock.advance(time.perf_counter() - step_start, time.perf_counter() - session_start)
            elapsed = clock.train_time_s
            window_samples += samples_per_step
            bar.update(1)

            if step % t_cfg.log_every == 0 or step == t_cfg.max_steps:
                last_loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(loss_count, 1)
                seconds = time.perf_counter() - window_start
                rate = window_samples / seconds
                if accelerator.is_main_process:
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", clips_s=f"{rate:.1f}")
                    with open(log_path, "a") as log:
                        log.write(json.dumps({"step": step, "loss": last_loss, "lr": lr, "clips_per_s": round(rate, 1),
                                              "tflop_per_s": round(rate * flops_per_clip / 1e12, 1),
                                              "data_wait_s": round(data_wait, 3), "window_s": round(seconds, 3),
                                              "train_time_s": round(elapsed, 1)}) + "\n")
                loss_sum.zero_()
                loss_count = 0
                window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0

            if t_cfg.val_every and step % t_cfg.val_every == 0:
                if accelerator.is_main_process:
                    pipe = build_pipeline(config, tokenizer, accelerator.unwrap_model(text_encoder), codec,
                                          accelerator.unwrap_model(transformer), ema,
                                          getattr(torch, config.export.dtype) if device.type == "cuda" else torch.float32)
                    scores = {"step": step, **validate(config, pipe, device)}
                    val_history.append(scores)
                    with open(log_path, "a") as log:
                        log.write(json.dumps({"event": "val", **scores}) + "\n")
                    del pipe
                accelerator.wait_for_everyone()
                window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0

            if step % t_cfg.checkpoint_every == 0 and step < t_cfg.max_steps and keep_going():
                _save_checkpoint(accelerator, output_dir, trainer_state())
                window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
    finally:
        bar.close()

    if loss_count:  # steps since the last log line
        last_loss = accelerator.reduce(loss_sum, reduction="mean").item() / loss_count
    _save_checkpoint(accelerator, output_dir, trainer_state())
    summary = stage_summary()
    record = {**summary, "stages": stages + [summary]}
    pipeline_dir = None
    if export and accelerator.is_main_process:
        pipeline_dir = Path(config.export.pipeline_dir) if config.export.pipeline_dir else output_dir / "pipeline"
        export_pipeline(config, tokenizer, accelerator.unwrap_model(text_encoder), codec,
                        accelerator.unwrap_model(transformer), ema, pipeline_dir, record)
        with open(log_path, "a") as log:
            log.write(json.dumps({"event": "end", **summary, "pipeline_dir": str(pipeline_dir)}) + "\n")
        logger.info("training done: %s", json.dumps(summary))
    accelerator.wait_for_everyone()
    if starts_process_group:
        # A process that exits with its group alive can abort in Gloo's threads at interpreter
        # shutdown ("terminate called without an active exception"); NCCL warns.
        accelerator.end_training()
    return TrainResult(step, (step - start_step) * samples_per_step, elapsed, last_loss, summary["clips_per_s"],
                       output_dir, pipeline_dir)


def _load_init_pipeline(path: Path) -> dict:
    """Weights and codec statistics of a pipeline folder, to start training from."""
    from transformers import UMT5EncoderModel

    from ..models import LIVEditorTransformer3DModel
    from ..models.tiny_codec import SpaceToDepthVideoCodec
    from ..pipelines.loading import check_pipeline_folder

    check_pipeline_folder(path)
    codec = SpaceToDepthVideoCodec.from_pretrained(str(path), subfolder="vae")
    return {
        "latents_mean": list(codec.config.latents_mean),
        "latents_std": list(codec.config.latents_std),
        "transformer": LIVEditorTransformer3DModel.from_pretrained(str(path), subfolder="transformer", torch_dtype=torch.float32),
        "text_encoder": UMT5EncoderModel.from_pretrained(str(path), subfolder="text_encoder", dtype=torch.float32),
    }


def _copy_weights(source: torch.nn.Module, target: torch.nn.Module, name: str, where) -> None:
    """Load `source`'s weights into `target`; a different architecture is a one-line error.

    Tensors the target's class may lack on loading (`_keys_to_ignore_on_load_missing`: additions
    initialised so that they leave the function unchanged) keep their initial values.
    """
    theirs, ours = source.state_dict(), target.state_dict()
    additions = [re.compile(p) for p in getattr(type(target), "_keys_to_ignore_on_load_missing", None) or []]
    added = [k for k in ours if k not in theirs and any(p.search(k) for p in additions)]
    mismatched = [k for k in ours if k not in added and (k not in theirs or theirs[k].shape != ours[k].shape)]
    mismatched += [k for k in theirs if k not in ours]
    if mismatched:
        raise LIVEditorError(
            f"train.init_from={where}: its {name} does not match the config's architecture "
            f"({len(mismatched)} tensors differ, e.g. {mismatched[0]})"
        )
    if added:
        logger.info("train.init_from=%s: %s starts %s from its initial values", where, name, ", ".join(added))
    target.load_state_dict({k: theirs[k].float() if k in theirs else ours[k] for k in ours})
