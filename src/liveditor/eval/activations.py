"""ISA fidelity on real activations: record the q/k/v that a trained LIVEditor's self-attention
layers see while editing, and run the ISA-vs-dense fidelity report on them.

Recording goes through the transformer's per-call attention callback (``attention_kwargs=
{"callback": ...}``), which hands over the q/k/v each self-attention layer attends with, on the
conditional branch of chosen denoising steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

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


def check_indices(name: str, values: Sequence[int], limit: int) -> list[int]:
    """Sorted distinct ints of ``values``, each in ``[0, limit)``; ValueError naming ``name`` otherwise."""
    values = sorted(set(int(v) for v in values))
    if not values or values[0] < 0 or values[-1] >= limit:
        raise ValueError(f"{name} must be in [0, {limit}), got {values}")
    return values


class ConditionalAttentionProbe:
    """Hands the self-attention events of chosen layers at chosen denoising steps, conditional CFG
    branch only, to ``on_event(event, step)``.

    Pass ``attention_callback`` as the pipeline's ``attention_kwargs["callback"]`` and
    ``step_callback`` as its ``callback_on_step_end``: the step callback says where a denoising step
    ends, and the first transformer forward of each step is the conditional branch (the pipeline
    runs it first). ``timesteps`` lists the timestep of every finished step.
    """

    def __init__(self, layers: Sequence[int], steps: Sequence[int], on_event: Callable[[AttentionEvent, int], None]):
        self.layers = frozenset(layers)
        self.steps = frozenset(steps)
        self.on_event = on_event
        self.step = 0
        self.timesteps: list[float] = []
        self._forwards = 0  # transformer forwards begun in the current step

    def attention_callback(self, event: AttentionEvent) -> None:
        if event.layer == 0:  # every forward runs its blocks in order
            self._forwards += 1
        if self._forwards == 1 and self.step in self.steps and event.layer in self.layers:
            self.on_event(event, self.step)

    def step_callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        self.timesteps.append(float(timestep))
        self.step = step + 1
        self._forwards = 0
        return {}


def record_attention(pipe, video, instruction: str, layers: Sequence[int], steps: Sequence[int],
                     **call_kwargs) -> list[RecordedAttention]:
    """Edit ``video`` with ``pipe`` and return the self-attention inputs of ``layers`` at denoising
    ``steps`` (0 = first step; the conditional CFG branch). The step count is the call's
    ``num_inference_steps`` or, without it, the pipeline folder's default."""
    num_layers = len(pipe.transformer.blocks)
    layers = check_indices("layers", layers, num_layers)
    num_steps, _ = pipe.sampling_settings(call_kwargs.get("num_inference_steps"))
    steps = check_indices("steps", steps, num_steps)

    records: list[RecordedAttention] = []

    def keep(event: AttentionEvent, step: int) -> None:
        records.append(
            RecordedAttention(
                layer=event.layer,
                step=step,
                timestep=float("nan"),  # known once the step ends
                q=event.query.detach().float().cpu(),
                k=event.key.detach().float().cpu(),
                v=event.value.detach().float().cpu(),
                gate=event.gate.detach().float().cpu(),
                num_source=event.num_source,
                grid=tuple(event.grid),
            )
        )

    probe = ConditionalAttentionProbe(layers, steps, keep)
    attention_kwargs = {**(call_kwargs.pop("attention_kwargs", None) or {}), "callback": probe.attention_callback}
    pipe(video, instruction, attention_kwargs=attention_kwargs, callback_on_step_end=probe.step_callback, **call_kwargs)
    for record in records:
        record.timestep = probe.timesteps[record.step]
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
