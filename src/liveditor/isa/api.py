"""Public API of the ISA operator."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import ISAConfig
from .dispatch import resolve_backend, resolve_few_key_backend
from .layout import block_means, expand_blocks, sequence_tile_permutation

MAX_HEAD_DIM = 256


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, N, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must have a floating dtype, got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k, v must have the same shape [B, H, N, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[2] == 0 or q.shape[3] == 0:
        raise ValueError(f"q, k, v must have tokens and a head dim, got shape {tuple(q.shape)}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[3]} is over the supported {MAX_HEAD_DIM}")


def _check_gate(gate, q) -> torch.Tensor:
    B, _, N, _ = q.shape
    if not isinstance(gate, torch.Tensor) or not gate.is_floating_point():
        raise ValueError("gate must be a floating torch.Tensor of shape [B, N] or [B, N, 1]")
    if tuple(gate.shape) not in ((B, N), (B, N, 1)):
        raise ValueError(f"gate must have shape [B, N] or [B, N, 1] = [{B}, {N}(, 1)], got {tuple(gate.shape)}")
    if gate.device != q.device:
        raise ValueError(f"gate is on {gate.device} but q on {q.device}")
    return gate.reshape(B, N)


def isa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_source: int,
    config: ISAConfig | None = None,
    *,
    gate: torch.Tensor | None = None,
    scale: float | None = None,
    grid: tuple[int, int, int] | None = None,
    backend: str = "auto",
    return_info: bool = False,
):
    """In-context Sparse Attention over a `[source | context]` sequence.

    Args:
        q, k, v: `[B, H, N, D]`; the first `num_source` tokens are the source (the video being
            generated), the remaining `N - num_source` the context (the clean input video).
        num_source: L_src, 1 <= L_src <= N. `L_src == N` means no context.
        config: ISAConfig (defaults: the paper's).
        gate: optional per-token coarse-residual gate `[B, N]` or `[B, N, 1]`, shared by heads.
        scale: softmax scale, default `1/sqrt(D)`.
        grid: the source's latent (frames, rows, cols), needed for `config.token_order="tile"`.
        backend: "auto" (fastest available), "torch" (this package's PyTorch path) or a kernel
            backend where installed.
        return_info: also return an ISAInfo with the decisions and the FLOP fraction.

    Returns:
        The output `[B, H, N, D]` in the input dtype, or `(output, ISAInfo)`.
    """
    config = ISAConfig() if config is None else config
    if not isinstance(config, ISAConfig):
        raise ValueError(f"config must be an ISAConfig, got {type(config).__name__}")
    _check_qkv(q, k, v)
    N = q.shape[2]
    if isinstance(num_source, bool) or not isinstance(num_source, int) or not 1 <= num_source <= N:
        raise ValueError(f"num_source must be an int in [1, N={N}], got {num_source!r}")
    if gate is not None:
        gate = _check_gate(gate, q)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif not isinstance(scale, (int, float)) or not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")

    order = _token_order(config, num_source, N, grid, q.device)
    if order is not None:
        q, k, v = q[:, :, order], k[:, :, order], v[:, :, order]
        if gate is not None:
            gate = gate[:, order]

    compute = resolve_backend(backend, q, config)
    with _own_precision(q):
        result = compute(q, k, v, num_source, config, gate, float(scale), return_info)
    if order is None:
        return result
    out, info = result if return_info else (result, None)
    out = out[:, :, torch.argsort(order)]
    return (out, info) if return_info else out


def _own_precision(q: torch.Tensor):
    """ISA computes in its own precision (fp32 pooling, coarse map, routing and logits from the
    input-dtype q, k, v), as its kernels do: autocast (a training step) would round the PyTorch
    path's matmuls to bf16 and so route differently from inference on the same inputs."""
    return torch.autocast(q.device.type, enabled=False)


def _token_order(config: ISAConfig, num_source: int, n_tokens: int, grid, device) -> torch.Tensor | None:
    """Permutation into tile order, or None for raster order."""
    if config.token_order != "tile":
        return None
    if grid is None:
        raise ValueError('token_order="tile" needs grid=(frames, rows, cols) of the source')
    return sequence_tile_permutation(num_source, n_tokens - num_source, tuple(grid), config.tile, device)


def coarse_residual(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_source: int,
    gate: torch.Tensor,
    config: ISAConfig | None = None,
    *,
    scale: float | None = None,
    grid: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """ISA's gated coarse residual alone: `gate * broadcast(P @ Vc)`, `[B, H, N, D]` in q's dtype.

    P is the coarse map over pooled blocks, with ISA's blocking (`config.block_size`, source and
    context padded separately, `config.token_order`); the ratios play no part. A model trained with
    ISA's residual always on (LIVEditor) computes "full attention" as `dense_attention + this`.
    """
    config = ISAConfig() if config is None else config
    if not isinstance(config, ISAConfig):
        raise ValueError(f"config must be an ISAConfig, got {type(config).__name__}")
    _check_qkv(q, k, v)
    B, _, N, _ = q.shape
    if isinstance(num_source, bool) or not isinstance(num_source, int) or not 1 <= num_source <= N:
        raise ValueError(f"num_source must be an int in [1, N={N}], got {num_source!r}")
    gate = _check_gate(gate, q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    order = _token_order(config, num_source, N, grid, q.device)
    if order is not None:
        q, k, v, gate = q[:, :, order], k[:, :, order], v[:, :, order], gate[:, order]
    b = config.block_size
    with _own_precision(q):
        qc, kc, vc = (block_means(x, num_source, b) for x in (q, k, v))
        probs = torch.softmax((qc @ kc.transpose(-1, -2)) * scale, dim=-1)
        residual = expand_blocks(probs @ vc, num_source, N, b) * gate.reshape(B, 1, N, 1).to(probs.dtype)
    if order is not None:
        residual = residual[:, :, torch.argsort(order)]
    return residual.to(q.dtype)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Full softmax attention over the whole sequence (PyTorch SDPA), the reference ISA approximates."""
    _check_qkv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def few_key_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None,
                      backend: str = "auto") -> torch.Tensor:
    """Softmax attention of `[B, N, H, D]` queries over `[B, L, H, D]` keys and values, token-major
    (diffusers' attention layout), for a short key sequence such as a text prompt's tokens.

    backend "auto": on CUDA, with at most 64 keys and head dim at most 128, Triton kernels that hold
    every key of a head in registers (at the tiny model's training shape 2.5x less device time than
    SDPA forward + backward, benchmarks/bench_few_keys.py); otherwise SDPA. "torch": SDPA;
    "triton": the kernels or an error. Under autocast the inputs are cast to its dtype first, as
    SDPA's autocast policy does. Returns `[B, N, H, D]`.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating [B, tokens, H, D] tensor")
    B, N, H, D = query.shape
    if key.shape != value.shape or key.shape[0] != B or key.shape[2:] != (H, D):
        raise ValueError(f"key and value must be [B={B}, L, H={H}, D={D}], got {tuple(key.shape)} and "
                         f"{tuple(value.shape)}")
    if N == 0 or key.shape[1] == 0 or D == 0:
        raise ValueError(f"need queries, keys and a head dim, got {tuple(query.shape)} over {tuple(key.shape)}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key, value must be on one device, got {query.device}, {key.device}, {value.device}")
    if torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query, key, value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if resolve_few_key_backend(backend, query, key) == "triton":
        from .triton_few_keys import few_key_attention_op

        return few_key_attention_op(query, key, value, 1.0 / math.sqrt(D) if scale is None else float(scale))[0]
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         scale=scale)
    return out.transpose(1, 2)
