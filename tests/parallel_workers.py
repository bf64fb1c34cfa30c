"""Functions the multi-process tests run on every rank (importable as `parallel_workers`, like
`tiny_models`, so that `liveditor.pipelines.parallel.launch` can start them in new processes).

Each returns what rank 0 saw, plus the largest difference between any rank's result and rank
0's, so a test also checks that every rank ends with the same result.
"""

from __future__ import annotations

import numpy as np
import torch

from liveditor.isa import ISAConfig
from liveditor.models import LIVEditorTransformer3DModel

# Sparse enough that ISA really routes: several blocks per segment, some skipped.
SPARSE_ISA = ISAConfig(block_size=8, select_ratio=0.5, full_ratio=0.5, exact_ratio=0.25)


def build_transformer(preset: str, seed: int, in_channels: int = 4, device="cpu", **overrides):
    """A randomly initialised transformer of `preset`, the same on every rank (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LIVEditorTransformer3DModel.from_preset(preset, in_channels=in_channels, out_channels=in_channels,
                                                        **overrides)
    return model.to(device).eval()


def transformer_inputs(model, seed: int, latent=(3, 8, 12), text_tokens: int = 7, batch: int = 1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    channels, text_dim = model.config.in_channels, model.config.text_dim
    x = torch.randn(batch, channels, *latent, generator=g)
    ctx = torch.randn(batch, channels, *latent, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, text_tokens, text_dim, generator=g)
    return tuple(v.to(device) for v in (x, t, text, ctx))


def transformer_output(case: dict, device="cpu") -> torch.Tensor:
    """One forward of `case` = dict(preset, mode, model_seed, input_seed, latent) on this process's
    transformer setting (sequence parallel or not)."""
    model = case["_model"]
    x, t, text, ctx = transformer_inputs(model, case["input_seed"], case["latent"], device=device)
    with torch.no_grad():
        out = model(x, t, text, ctx, attention_kwargs={"mode": case["mode"], "isa_config": SPARSE_ISA}).sample
    return out.float().cpu()


def exact_fp32() -> None:
    """No TF32 in matmuls or cuDNN convolutions (the Wan VAE, the patch embedding): a 1e-7 change of
    an input can move a TF32-rounded product by 1e-3, so TF32 would hide the layouts' agreement."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _max_rank_difference(tensor: torch.Tensor, device) -> float:
    import torch.distributed as dist

    gathered = [torch.empty_like(tensor, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.to(device))
    return max(float((g.cpu() - tensor).abs().max()) for g in gathered)


def ulysses_transformer_outputs(cases: list[dict], device_type: str = "cpu"):
    """On every rank: each case's forward with Ulysses over all ranks of the world.
    Returns [(output, max difference across ranks)]."""
    from liveditor.pipelines.parallel import ParallelLayout

    import torch.distributed as dist

    exact_fp32()
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    layout = ParallelLayout.create(1, dist.get_world_size())
    results = []
    models = {}
    for case in cases:
        key = (case["preset"], case["model_seed"])
        if key not in models:
            models[key] = build_transformer(case["preset"], case["model_seed"], device=device)
            models[key].enable_sequence_parallel(layout.ulysses_group)
        out = transformer_output({**case, "_model": models[key]}, device)
        results.append((out, _max_rank_difference(out, device)))
    return results


def single_transformer_outputs(cases: list[dict], device="cpu") -> list[torch.Tensor]:
    models, results = {}, []
    for case in cases:
        key = (case["preset"], case["model_seed"])
        if key not in models:
            models[key] = build_transformer(case["preset"], case["model_seed"], device=device)
        results.append(transformer_output({**case, "_model": models[key]}, device))
    return results


def enable_bad_ulysses(preset: str, num_attention_heads: int):
    """Ulysses over the whole world on a model whose heads it cannot divide (raises)."""
    from liveditor.pipelines.parallel import ParallelLayout

    import torch.distributed as dist

    layout = ParallelLayout.create(1, dist.get_world_size())
    model = build_transformer(preset, 0, num_attention_heads=num_attention_heads)
    model.enable_sequence_parallel(layout.ulysses_group)


def fail_on_rank(rank_to_fail: int):
    """Every rank meets in a collective; `rank_to_fail` raises before it (the others would wait)."""
    import torch.distributed as dist

    if dist.get_rank() == rank_to_fail:
        raise RuntimeError("boom on purpose\nsecond line")
    dist.barrier()
    dist.barrier()
    return "finished"


def pipeline_edits(layouts: list[tuple[int, int]], calls: list[dict], device_type: str = "cpu"):
    """The tiny test pipeline's edit of each of `calls` on every rank under each (CFG, Ulysses)
    layout; per call, per layout: (rank 0's frames, rank 0's timings, largest final-latent
    difference across ranks)."""
    from tiny_models import tiny_pipeline

    from liveditor.pipelines.parallel import ParallelLayout

    import torch.distributed as dist

    exact_fp32()
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    pipe = tiny_pipeline(seed=0).to(device)
    pipe.set_progress_bar_config(disable=True)
    latents = {}

    def keep(p, i, t, tensors):
        latents["last"] = tensors["latents"].detach().clone()
        return {}

    layouts = [ParallelLayout.create(cfg_degree, ulysses) for cfg_degree, ulysses in layouts]
    results = []
    for call in calls:
        per_layout = []
        for layout in layouts:
            pipe.enable_parallel(layout)
            out = pipe(**call, callback_on_step_end=keep)
            if (out.frames is None) != (dist.get_rank() != 0):
                raise AssertionError(f"rank {dist.get_rank()} returned frames={type(out.frames).__name__}")
            per_layout.append((out.frames, out.timings, _max_rank_difference(latents["last"].cpu(), device)))
        results.append(per_layout)
    return results


def edit_video_input(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)


def fail_on_rank_1_at_step_1(pipe, step, timestep, tensors):
    """A step callback that makes rank 1 fail in the middle of the denoising loop."""
    import torch.distributed as dist

    if dist.get_rank() == 1 and step == 1:
        raise RuntimeError("rank 1 fails mid-edit")
    return {}
