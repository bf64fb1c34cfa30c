"""Backend choice for isa_attention and few_key_attention.

"torch": the PyTorch path (any device and dtype, the reference). "triton": the Triton kernels
(CUDA; also Triton's CPU interpreter when TRITON_INTERPRET=1, for tests). "auto": triton for the
CUDA inputs it runs, else torch, saying once per reason in a log line why it fell back: at WARNING
for CUDA inputs (the kernels were expected and a slower path runs), at INFO otherwise (the PyTorch
path is the normal one on CPU).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from .config import ISAConfig
from .reference import isa_attention_torch

BACKENDS = ("auto", "torch", "triton")

logger = logging.getLogger(__name__)
_fallbacks_logged: set[str] = set()


def _log_fallback_once(reason: str, q: torch.Tensor) -> None:
    if torch.compiler.is_compiling():  # a log call breaks a compiled graph (fullgraph: an error)
        return
    if reason not in _fallbacks_logged:
        _fallbacks_logged.add(reason)
        level = logging.WARNING if q.is_cuda else logging.INFO
        logger.log(level, "ISA backend auto: using the PyTorch path because %s", reason)


def _triton_kernels(backend: str, q: torch.Tensor, load: Callable[[], tuple[Any, str | None]]):
    """(kernels, None) when `backend` runs the Triton kernels on these inputs, else (None, why not):
    the reason is None where "torch" was asked for. `load` imports the kernels and returns them with
    why they cannot run these inputs (None if they can); "triton" raises a one-line ValueError where
    they are missing or cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return None, None
    if backend == "auto" and not q.is_cuda:  # decided without importing the kernels (and Triton)
        return None, f"inputs are on {q.device.type}, not CUDA"
    try:
        kernels, reason = load()
    except ImportError as exc:  # triton missing or broken
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if backend == "triton":
            raise ValueError(f'backend="triton" is not available: {first_line}') from exc
        return None, f"the Triton kernels cannot be imported ({first_line})"
    if reason is None:
        return kernels, None
    if backend == "triton":
        raise ValueError(f'backend="triton" cannot run these inputs: {reason}')
    return None, reason


def resolve_backend(backend: str, q: torch.Tensor, config: ISAConfig) -> Callable:
    """The function that computes ISA for `backend` on these inputs."""

    def load():
        from .ops import isa_attention_triton, triton_unsupported_reason

        return isa_attention_triton, triton_unsupported_reason(q, config)

    kernels, reason = _triton_kernels(backend, q, load)
    if kernels is not None:
        return kernels
    if reason is not None:
        _log_fallback_once(reason, q)
    return isa_attention_torch


def resolve_few_key_backend(backend: str, q: torch.Tensor, k: torch.Tensor) -> str:
    """"torch" (SDPA) or "triton" for few_key_attention on these inputs.

    "auto": the Triton kernels for the CUDA inputs they run (they exist for speed; SDPA computes the
    same function and is the normal path elsewhere, so falling back is not logged).
    """

    def load():
        from .triton_few_keys import unsupported_reason

        return "triton", unsupported_reason(q, k)

    kernels, _ = _triton_kernels(backend, q, load)
    return kernels or "torch"
