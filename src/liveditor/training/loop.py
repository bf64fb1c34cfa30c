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
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import LIVEditorError
from ..pipelines.pipeline_liveditor import encode_instructions
from .config import TrainConfig
from .ema import EMA
from .flow import NUM_TRAIN_TIMESTEPS, flow_matching_loss, flow_matching_pair, sample_sigmas

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
    )
    return tokenizer, text_encoder, codec, transformer


# ---------------------------------------------------------------------------------------------
# Data


def _shapeedit_config(config: TrainConfig):
    from ..data.shapes import ShapeEditConfig

    return ShapeEditConfig(frames=config.data.frames, height=config.data.height, width=config.data.width)


class ResumableRandomSampler(Sampler):
    """Endless shuffled indices of `length` items for one of `num_replicas` processes.

    Epoch `e` is a permutation seeded by (seed, e); process `rank` takes every `num_replicas`-th
    index. `start` skips that many of this process's indices, so a resumed run continues exactly
    where the checkpoint left off.
    """

    def __init__(self, length: int, seed: int, rank: int = 0, num_replicas: int = 1, start: int = 0):
        if length < num_replicas:
            raise LIVEditorError(f"dataset of {length} clips is smaller than the {num_replicas} processes")
        self.length, self.seed, self.rank, self.num_replicas, self.start = length, seed, rank, num_replicas, start

    def __iter__(self) -> Iterator[int]:
        per_epoch = self.length // self.num_replicas
        epoch, offset = divmod(self.start, per_epoch)
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.length)
            mine = order[self.rank :: self.num_replicas][:per_epoch]
            for index in mine[offset:]:
                yield int(index)
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader only needs a number
        return 2**62


def video_batch_to_model(videos: torch.Tensor, device) -> torch.Tensor:
    """A batch of uint8 clips `[B, F, H, W, 3]` as the codec's input `[B, 3, F, H, W]` in [-1, 1]."""
    if videos.dtype != torch.uint8 or videos.dim() != 5 or videos.shape[-1] != 3:
        raise ValueError(f"expected uint8 clips [B, F, H, W, 3], got {videos.dtype} {tuple(videos.shape)}")
    videos = videos.to(device, non_blocking=True)
    return videos.permute(0, 4, 1, 2, 3).float().div_(127.5).sub_(1.0)


def _batches(config: TrainConfig, rank: int, world: int, consumed: int, pin_memory: bool) -> Iterator[dict]:
    """Endless training batches for this process, starting after `consumed` of its samples."""
    data = config.data
    common = dict(
        batch_size=config.train.batch_size,
        num_workers=data.num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=data.num_workers > 0,
        # Its own generator, so creating the loader does not draw from the global RNG (which a
        # resumed run restores and which must give the same noise as an uninterrupted run).
        generator=torch.Generator().manual_seed(config.train.seed * 1009 + rank),
    )
    if data.source == "procedural":
        from ..data.shards import ShapeEditDataset

        dataset = ShapeEditDataset(data.num_examples, "train", data.start_seed, _shapeedit_config(config))
        sampler = ResumableRandomSampler(len(dataset), config.train.seed, rank, world, consumed)
        yield from DataLoader(dataset, sampler=sampler, **common)
        return

    from ..data.shards import ShapeEditShards

    # Shard streams resume with a fresh shuffle (epoch = samples already consumed), not mid-shard.
    epoch = consumed
    while True:
        dataset = ShapeEditShards(data.source, shuffle=True, seed=config.train.seed, process_index=rank, num_processes=world)
        dataset.set_epoch(epoch)
        produced = 0
        for batch in DataLoader(dataset, **{**common, "persistent_workers": False}):
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


def learning_rate(config: TrainConfig, step: int, elapsed_s: float) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio over whichever limit (steps or time)
    is nearer."""
    o, t = config.optim, config.train
    warmup = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps else 1.0
    progress = step / t.max_steps
    if t.max_time_s > 0:
        progress = max(progress, elapsed_s / t.max_time_s)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return o.lr * warmup * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * cosine)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` onto `final`. At every moment either `final` or
    `final.old` is a complete folder; `find_checkpoint` looks at both."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def find_checkpoint(output_dir: Path) -> Path | None:
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        path = output_dir / name
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
        _replace_dir(tmp, output_dir / CHECKPOINT_DIR)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------
# Export


def export_pipeline(config: TrainConfig, tokenizer, text_encoder, codec, transformer, ema: EMA | None,
                    pipeline_dir: Path, summary: dict) -> Path:
    """Write a LIVEditorPipeline folder (EMA weights when `ema` is given) atomically."""
    from ..pipelines.pipeline_liveditor import LIVEditorPipeline, flow_unipc_scheduler

    pipeline_dir = Path(pipeline_dir)
    if pipeline_dir.exists() and not (pipeline_dir / "model_index.json").is_file():
        raise LIVEditorError(f"{pipeline_dir} exists and is not a pipeline folder; refusing to replace it")
    dtype = getattr(torch, config.export.dtype)
    text_encoder = copy.deepcopy(text_encoder).float().cpu()
    transformer = copy.deepcopy(transformer).float().cpu()
    if ema is not None:
        ema.copy_to({"text_encoder": text_encoder, "transformer": transformer})
    pipeline = LIVEditorPipeline(
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
    pipeline_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pipeline_dir.with_name(f".{pipeline_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipeline.save_pretrained(str(tmp))
    (tmp / TRAINING_SUMMARY).write_text(json.dumps(summary, indent=2))
    _replace_dir(tmp, pipeline_dir)
    return pipeline_dir


# ---------------------------------------------------------------------------------------------
# The loop


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


def train(config: TrainConfig, resume: bool = True, progress: bool = True, export: bool = True) -> TrainResult:
    """Train (or continue training) the model the config describes; returns what was done."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    t_cfg = config.train
    mixed = t_cfg.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=t_cfg.grad_accum_steps)
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    output_dir = Path(t_cfg.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    checkpoint = find_checkpoint(output_dir) if resume else None
    state = json.loads((checkpoint / TRAINER_STATE).read_text()) if checkpoint else {}
    init = None
    if state:
        latents_mean, latents_std = state["latents_mean"], state["latents_std"]
    elif t_cfg.init_from:
        init = _load_init_pipeline(Path(t_cfg.init_from))
        latents_mean, latents_std = init["latents_mean"], init["latents_std"]
    else:
        latents_mean, latents_std = estimate_latent_statistics(config)

    set_seed(t_cfg.seed)  # same initial weights on every process
    tokenizer, text_encoder, codec, transformer = build_components(config, latents_mean, latents_std)
    if init is not None:
        _copy_weights(init["text_encoder"], text_encoder, "text_encoder", t_cfg.init_from)
        _copy_weights(init["transformer"], transformer, "transformer", t_cfg.init_from)
    if t_cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    codec.to(device)
    ema = EMA({"text_encoder": text_encoder, "transformer": transformer}, t_cfg.ema_decay).to(device)
    optimizer = torch.optim.AdamW(
        _param_groups([transformer, text_encoder], config.optim.weight_decay),
        lr=config.optim.lr,
        betas=tuple(config.optim.betas),
        eps=config.optim.eps,
    )
    transformer, text_encoder, optimizer = accelerator.prepare(transformer, text_encoder, optimizer)
    accelerator.register_for_checkpointing(ema)

    step = int(state.get("step", 0))
    elapsed = float(state.get("train_time_s", 0.0))
    if checkpoint:
        accelerator.load_state(str(checkpoint))
        if accelerator.is_main_process:
            logger.info("resumed from %s at step %d", checkpoint, step)
    else:  # different noise per process; a resumed run has every process's RNG state back
        set_seed(t_cfg.seed + 1000 * rank)

    samples_per_step = t_cfg.batch_size * t_cfg.grad_accum_steps * world
    batches = _batches(config, rank, world, step * t_cfg.batch_size * t_cfg.grad_accum_steps, device.type == "cuda")
    n_params = sum(p.numel() for p in accelerator.unwrap_model(transformer).parameters())
    n_text = sum(p.numel() for p in accelerator.unwrap_model(text_encoder).parameters())
    run_info = {
        "device": _device_name(device),
        "processes": world,
        "mixed_precision": mixed,
        "attention": config.model.attention,
        "transformer_params": n_params,
        "text_encoder_params": n_text,
        "tokens_per_clip": 2 * math.prod(
            (config.data.frames // config.codec.scale_factor_temporal // config.model.patch_size[0],
             config.data.height // config.codec.scale_factor_spatial // config.model.patch_size[1],
             config.data.width // config.codec.scale_factor_spatial // config.model.patch_size[2])
        ),
    }
    log_path = output_dir / LOG_FILE
    if accelerator.is_main_process:
        logger.info("training %s", json.dumps(run_info))
        with open(log_path, "a") as log:
            log.write(json.dumps({"event": "start", "step": step, **run_info, "config": config.to_dict()}) + "\n")

    def time_left() -> bool:
        return t_cfg.max_time_s <= 0 or elapsed < t_cfg.max_time_s

    bar = tqdm(total=t_cfg.max_steps, initial=step, desc="train", unit="step",
               disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    window_start, window_samples = time.perf_counter(), 0
    data_wait = 0.0  # seconds this window spent waiting for the data loader
    last_loss = float("nan")
    transformer.train()
    text_encoder.train()
    try:
        while step < t_cfg.max_steps and time_left():
            step_start = time.perf_counter()
            lr = learning_rate(config, step, elapsed)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(t_cfg.grad_accum_steps):
                # Instruction dropout from (seed, process, step, micro-batch): identical after a resume.
                drop_rng = np.random.default_rng([t_cfg.seed, rank, step, micro])
                wait_start = time.perf_counter()
                batch = next(batches)
                data_wait += time.perf_counter() - wait_start
                with accelerator.accumulate(transformer, text_encoder):
                    loss = _step_loss(config, batch, tokenizer, text_encoder, codec, transformer, device, drop_rng)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.optim.grad_clip > 0:
                        accelerator.clip_grad_norm_(
                            list(transformer.parameters()) + list(text_encoder.parameters()), config.optim.grad_clip
                        )
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                loss_count += 1
            ema.update({"text_encoder": accelerator.unwrap_model(text_encoder),
                        "transformer": accelerator.unwrap_model(transformer)})
            step += 1
            elapsed += time.perf_counter() - step_start
            window_samples += samples_per_step
            bar.update(1)

            if step % t_cfg.log_every == 0 or step == t_cfg.max_steps:
                last_loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(loss_count, 1)
                rate = window_samples / (time.perf_counter() - window_start)
                if accelerator.is_main_process:
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", clips_s=f"{rate:.1f}")
                    with open(log_path, "a") as log:
                        log.write(json.dumps({"step": step, "loss": last_loss, "lr": lr, "clips_per_s": rate,
                                              "data_wait_s": data_wait, "train_time_s": elapsed}) + "\n")
                loss_sum.zero_()
                loss_count = 0
                window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0

            if step % t_cfg.checkpoint_every == 0 and step < t_cfg.max_steps and time_left():
                _save_checkpoint(accelerator, output_dir, _trainer_state(step, elapsed, samples_per_step, latents_mean, latents_std))
                window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
    finally:
        bar.close()

    state = _trainer_state(step, elapsed, samples_per_step, latents_mean, latents_std)
    _save_checkpoint(accelerator, output_dir, state)
    if loss_count:  # steps since the last log line
        last_loss = accelerator.reduce(loss_sum, reduction="mean").item() / loss_count
    summary = {**run_info, "steps": step, "samples": step * samples_per_step, "train_time_s": round(elapsed, 1),
               "last_loss": last_loss, "clips_per_s": round(step * samples_per_step / max(elapsed, 1e-9), 2),
               "batch_size": samples_per_step, "init_from": t_cfg.init_from or None}
    pipeline_dir = None
    if export and accelerator.is_main_process:
        pipeline_dir = Path(config.export.pipeline_dir) if config.export.pipeline_dir else output_dir / "pipeline"
        export_pipeline(config, tokenizer, accelerator.unwrap_model(text_encoder), codec,
                        accelerator.unwrap_model(transformer), ema, pipeline_dir, summary)
        with open(log_path, "a") as log:
            log.write(json.dumps({"event": "end", **summary, "pipeline_dir": str(pipeline_dir)}) + "\n")
        logger.info("training done: %s", json.dumps(summary))
    accelerator.wait_for_everyone()
    return TrainResult(step, step * samples_per_step, elapsed, last_loss, summary["clips_per_s"], output_dir, pipeline_dir)


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
    """Load `source`'s weights into `target`; a different architecture is a one-line error."""
    theirs, ours = source.state_dict(), target.state_dict()
    mismatched = [k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape]
    mismatched += [k for k in theirs if k not in ours]
    if mismatched:
        raise LIVEditorError(
            f"train.init_from={where}: its {name} does not match the config's architecture "
            f"({len(mismatched)} tensors differ, e.g. {mismatched[0]})"
        )
    target.load_state_dict({k: theirs[k].float() for k in ours})


def _trainer_state(step, elapsed, samples_per_step, latents_mean, latents_std) -> dict:
    return {"step": step, "samples": step * samples_per_step, "train_time_s": elapsed,
            "latents_mean": latents_mean, "latents_std": latents_std}


def _step_loss(config, batch, tokenizer, text_encoder, codec, transformer, device, drop_rng) -> torch.Tensor:
    """The flow-matching loss of one batch."""
    source = video_batch_to_model(batch["source"], device)
    target = video_batch_to_model(batch["target"], device)
    with torch.no_grad():
        context = codec.normalize(codec.encode(source).latent_dist.mode())
        x0 = codec.normalize(codec.encode(target).latent_dist.mode())
    n = len(batch["instruction"])
    drop = drop_rng.random(n) < config.text.drop_prob
    null = drop_rng.integers(len(NULL_PROMPTS), size=n)
    prompts = [NULL_PROMPTS[k] if d else p for p, d, k in zip(batch["instruction"], drop, null)]
    text = encode_instructions(tokenizer, text_encoder, prompts, config.text.max_length)
    sigmas = sample_sigmas(x0.shape[0], config.train.flow_shift, device=device)
    noise = torch.randn_like(x0)
    x_t, velocity = flow_matching_pair(x0, noise, sigmas)
    prediction = transformer(x_t, sigmas * NUM_TRAIN_TIMESTEPS, text, context, return_dict=False)[0]
    return flow_matching_loss(prediction, velocity)
