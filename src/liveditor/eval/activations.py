"""ISA fidelity on real activations: record the q/k/v that a trained LIVEditor's self-attention
layers see while editing, and run the ISA-vs-dense fidelity report on them.

Recording goes through the transformer's per-call attention callback (``attention_kwargs=
{"callback": ...}``), which hands over the q/k/v each self-attention layer attends with, on the
conditional branch of chosen denoising steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..isa.report import fidelity_table, report_configs
from ..models import AttentionEvent


@dataclass
class RecordedAttention:
    """The inputs of one self-attention call: q, k, v ``[B, H, N, D]`` and the coarse-residual gate
    ``[B, N]`` (float32, CPU)."""

    layer: int
    step: int
    timestep: float
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    gate: torch.Tensor
    num_source: int
    grid: tuple[int, int, int]


def _check_indices(name: str, values: Sequence[int], limit: int) -> list[int]:
    values = sorted(set(int(v) for v in values))
    if not values or values[0] < 0 or values[-1] >= limit:
        raise ValueError(f"{name} must be in [0, {limit}), got {values}")
    return values


def record_attention(pipe, video, instruction: str, layers: Sequence[int], steps: Sequence[int], **call_kwargs) -> list[RecordedAttention]:
    """Edit ``video`` with ``pipe`` and return the self-attention inputs of ``layers`` at denoising
    ``steps`` (0 = first step; the conditional CFG branch, which the pipeline runs first)."""
    transformer = pipe.transformer
    num_layers = len(transformer.blocks)
    layers = _check_indices("layers", layers, num_layers)
    num_steps = call_kwargs.get("num_inference_steps", 32)
    steps = _check_indices("steps", steps, num_steps)

    records: list[RecordedAttention] = []
    state = {"step": -1, "timestep": None, "recording": False}

    def on_transformer(module, args, kwargs):
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        value = float(timestep.flatten()[0])
        if value != state["timestep"]:  # a new denoising step; its first call is the conditional branch
            state["step"] += 1
            state["timestep"] = value
            state["recording"] = state["step"] in steps
        else:
            state["recording"] = False

    def on_attention(event: AttentionEvent) -> None:
        if not state["recording"] or event.layer not in layers:
            return
        records.append(
            RecordedAttention(
                layer=event.layer,
                step=state["step"],
                timestep=state["timestep"],
                q=event.query.detach().float().cpu(),
                k=event.key.detach().float().cpu(),
                v=event.value.detach().float().cpu(),
                gate=event.gate.detach().float().cpu(),
                num_source=event.num_source,
                grid=tuple(event.grid),
            )
        )

    attention_kwargs = {**(call_kwargs.pop("attention_kwargs", None) or {}), "callback": on_attention}
    handle = transformer.register_forward_pre_hook(on_transformer, with_kwargs=True)
    try:
        pipe(video, instruction, attention_kwargs=attention_kwargs, **call_kwargs)
    finally:
        handle.remove()
    return records


DEFAULT_CHOICES = ("energy / raster (default)", "topk / raster", "energy / tile", "topk / tile")


def activation_fidelity(records: Sequence[RecordedAttention], configs=None, backend: str = "auto") -> dict:
    """Fidelity table of ISA against dense on every record, and its mean per config.

    Returns ``{"per_record": [{layer, step, rows}], "mean": [{config, rel_l1, rel_l2, cosine,
    flop_fraction, records}], "best_default": name}``, where ``best_default`` is the sharpness /
    token-order choice (at the paper's ratios) with the lowest mean relative L2 error.
    """
    if not records:
        raise ValueError("no recorded activations")
    configs = report_configs() if configs is None else configs
    per_record = []
    for rec in records:
        rows = fidelity_table(rec.q, rec.k, rec.v, rec.num_source, grid=rec.grid, configs=configs, backend=backend)
        per_record.append({"layer": rec.layer, "step": rec.step, "timestep": rec.timestep, "rows": rows})
    mean = []
    for name in configs:
        rows = [r for entry in per_record for r in entry["rows"] if r["config"] == name and "skipped" not in r]
        if not rows:
            mean.append({"config": name, "skipped": "no record could run it"})
            continue
        entry = {"config": name, "records": len(rows)}
        for key in ("rel_l1", "rel_l2", "cosine", "flop_fraction"):
            entry[key] = float(np.mean([r[key] for r in rows]))
        mean.append(entry)
    candidates = [m for m in mean if m["config"] in DEFAULT_CHOICES and "skipped" not in m]
    best = min(candidates, key=lambda m: m["rel_l2"])["config"] if candidates else None
    return {"per_record": per_record, "mean": mean, "best_default": best}
