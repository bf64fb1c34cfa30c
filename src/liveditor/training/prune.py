"""Smaller models from trained ones: drop transformer blocks of a pipeline folder.

A model with fewer blocks trains and edits faster, nearly in proportion (the tiny model's training
step on one H200: 1,270 clips/s with 8 blocks, 1,641 with 6; docs/benchmarks.md), and a new stage
started from the kept blocks of a trained model (`train.init_from`) has much of its function already.

    config = load_config("configs/tiny-shapeedit.toml")
    keep, full_loss, rounds = choose_blocks_to_keep("model", drop=3, config=config)
    prune_blocks("model", keep, "model-5-blocks")

`choose_blocks_to_keep` drops greedily: each round removes the block whose absence raises the training
loss least (the loop's own loss on fixed clips and noise, dense attention), then measures again.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..atomic import atomic_directory, write_json
from ..errors import LIVEditorError
from .config import TrainConfig

PRUNING_FILE = "pruning.json"


@dataclass
class DropRound:
    """One greedy round: the loss with each remaining block left out, and the block dropped."""

    losses: dict[int, float]
    dropped: int


def _transformer_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The transformer's config and weights as stored (dtypes kept) in a pipeline folder."""
    sub = folder / "transformer"
    config = json.loads((sub / "config.json").read_text())
    index = sub / "diffusion_pytorch_model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["diffusion_pytorch_model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(sub / name)))
    return config, state


def _check_keep(keep, num_layers: int) -> list[int]:
    """`keep` as a sorted list of distinct block numbers of a `num_layers`-block model, or a one-line error."""
    keep = [int(k) for k in keep]
    if not keep:
        raise LIVEditorError("keep at least one block")
    if len(set(keep)) != len(keep):
        raise LIVEditorError(f"block numbers to keep repeat: {keep}")
    outside = [k for k in keep if not 0 <= k < num_layers]
    if outside:
        raise LIVEditorError(f"the model has blocks 0-{num_layers - 1}; no block {outside[0]}")
    return sorted(keep)


def prune_blocks(model_dir, keep, output, overwrite: bool = False) -> Path:
    """Write a copy of the pipeline folder `model_dir` (None: the bundled model) whose transformer
    has only the blocks in `keep` (renumbered 0, 1, ... in their order), every other component
    unchanged, and `pruning.json` saying where it came from. The folder appears only once complete;
    an existing `output` is replaced only with `overwrite`."""
    from ..models import LIVEditorTransformer3DModel
    from ..pipelines.loading import check_pipeline_folder
    from .loop import MAX_SHARD_SIZE

    source = check_pipeline_folder(model_dir)
    output = Path(output)
    if output.exists() and not overwrite:
        raise LIVEditorError(f"{output} already exists; pass overwrite=True (--overwrite) to replace it")
    if output.resolve() == source.resolve():
        raise LIVEditorError("the pruned model must go to a new folder, not over the model it comes from")
    config, state = _transformer_state(source)
    keep = _check_keep(keep, config["num_layers"])
    renumbered = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            _, block, rest = key.split(".", 2)
            if int(block) in keep:
                renumbered[f"blocks.{keep.index(int(block))}.{rest}"] = value
        else:
            renumbered[key] = value
    model_config = {k: v for k, v in config.items() if not k.startswith("_")}
    model_config["num_layers"] = len(keep)
    model = LIVEditorTransformer3DModel.from_config(model_config)
    # assign=True: the parameters take the stored tensors, so each keeps its stored dtype.
    model.load_state_dict(renumbered, strict=True, assign=True)
    with atomic_directory(output, replace=overwrite) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("transformer", PRUNING_FILE))
        model.save_pretrained(str(tmp / "transformer"), max_shard_size=MAX_SHARD_SIZE)
        write_json(tmp / PRUNING_FILE, {"source": str(source), "source_num_layers": config["num_layers"],
                                        "kept_blocks": keep})
    return output


def choose_blocks_to_keep(model_dir, drop: int, config: TrainConfig, clips: int = 24, seed: int = 0,
                          device: str = "cpu", progress: bool = True) -> tuple[list[int], float, list[DropRound]]:
    """Greedily choose `drop` blocks of the folder's transformer (None: the bundled model) to leave
    out: each round drops the block whose absence gives the lowest training loss (`config`'s loss:
    edit weighting, timestep shift, prompt drops) on `clips` training clips with noise from `seed`,
    the same clips and noise for every candidate, dense attention, on `device`. `config` is not
    changed. Returns (blocks kept, the full model's loss, the rounds)."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from ..data.shapes_batch import example_seeds
    from ..data.shards import ShapeEditDataset
    from ..pipelines.loading import check_pipeline_folder
    from .loop import (ENDLESS, TrainStep, _copy_weights, _load_init_pipeline, _shapeedit_config, build_components,
                       sample_seeds)

    if clips < 1:
        raise LIVEditorError(f"clips must be at least 1, got {clips}")
    source = check_pipeline_folder(model_dir)
    init = _load_init_pipeline(source)
    num_layers = init["transformer"].config.num_layers
    if not 1 <= drop < num_layers:
        raise LIVEditorError(f"the model has {num_layers} blocks: drop between 1 and {num_layers - 1}, got {drop}")
    config = copy.deepcopy(config)
    config.model.num_layers = num_layers
    config.train.compile = False
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)  # accelerate runs on the current CUDA device
    tokenizer, text_encoder, codec, transformer = build_components(config, init["latents_mean"], init["latents_std"])
    _copy_weights(init["transformer"], transformer, "transformer", source)
    _copy_weights(init["text_encoder"], text_encoder, "text_encoder", source)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="no" if device == "cpu" else "bf16")
    step = TrainStep(config, accelerator, tokenizer, text_encoder, codec, transformer)
    dataset = ShapeEditDataset(ENDLESS, "train", config=_shapeedit_config(config))
    items = list(DataLoader(dataset, sampler=example_seeds(config.train.seed, 0, 0, clips), batch_size=None))
    batch = {"source": torch.stack([x["source"] for x in items]), "target": torch.stack([x["target"] for x in items]),
             "instruction": [x["instruction"] for x in items]}
    noise_seeds = sample_seeds(seed, 0, np.arange(clips))
    blocks = list(transformer.blocks)

    def loss_without(dropped: list[int]) -> float:
        transformer.blocks = torch.nn.ModuleList([b for i, b in enumerate(blocks) if i not in dropped])
        with torch.no_grad():
            return float(step.loss(batch, noise_seeds, mode="dense"))

    dropped: list[int] = []
    bar = tqdm(total=1 + sum(num_layers - r for r in range(drop)), desc="block losses", unit="model",
               disable=not progress)
    full = loss_without([])
    bar.update()
    rounds = []
    for _ in range(drop):
        losses = {}
        for block in range(num_layers):
            if block not in dropped:
                losses[block] = loss_without(dropped + [block])
                bar.update()
        rounds.append(DropRound(losses, min(losses, key=losses.get)))
        dropped.append(rounds[-1].dropped)
    bar.close()
    transformer.blocks = torch.nn.ModuleList(blocks)
    return [i for i in range(num_layers) if i not in dropped], full, rounds
