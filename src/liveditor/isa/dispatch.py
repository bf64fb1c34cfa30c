"""Backend choice for isa_attention."""

from __future__ import annotations

from typing import Callable

import torch

from .config import ISAConfig
from .reference import isa_attention_torch

BACKENDS = ("auto", "torch")


def resolve_backend(backend: str, q: torch.Tensor, config: ISAConfig) -> Callable:
    """The function that computes ISA for `backend` on these inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return isa_attention_torch
