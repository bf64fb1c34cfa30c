"""Token layouts: blocking with separate source/context padding, and spatio-temporal tile order."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import segment_blocks


@dataclass
class BlockLayout:
    """Where each token sits once source and context are padded separately to whole blocks.

    Padded sequence: `num_blocks * block_size` slots; source blocks first, then context blocks.
    """

    token_index: torch.Tensor  # [nb, b] long: token of each slot (padding slots repeat a real token)
    slot_valid: torch.Tensor  # [nb, b] bool: slot holds a real token
    block_length: torch.Tensor  # [nb] long: real tokens per block (>= 1)
    token_slot: torch.Tensor  # [N] long: slot (flattened) of each token

    @property
    def num_blocks(self) -> int:
        return self.token_index.shape[0]

    @property
    def whole_blocks(self) -> bool:
        """Every block holds block_size real tokens: slot order is token order, no padding slots."""
        return self.token_index.numel() == self.token_slot.numel()


def block_layout(num_source: int, num_context: int, block_size: int, device) -> BlockLayout:
    b = block_size
    n_src, n_ctx = segment_blocks(num_source, num_context, b)
    offsets = torch.arange(b, device=device)

    def segment(start: int, length: int, n_blocks: int):
        local = torch.arange(n_blocks, device=device)[:, None] * b + offsets  # [n, b]
        valid = local < length
        index = start + torch.where(valid, local, torch.zeros_like(local))
        return index, valid

    src_index, src_valid = segment(0, num_source, n_src)
    ctx_index, ctx_valid = segment(num_source, num_context, n_ctx)
    token_index = torch.cat([src_index, ctx_index])
    slot_valid = torch.cat([src_valid, ctx_valid])
    n_tokens = num_source + num_context
    flat_valid = slot_valid.flatten()
    token_slot = torch.empty(n_tokens, dtype=torch.long, device=device)
    token_slot[token_index.flatten()[flat_valid]] = torch.nonzero(flat_valid).squeeze(1)
    return BlockLayout(
        token_index=token_index,
        slot_valid=slot_valid,
        block_length=slot_valid.sum(1),
        token_slot=token_slot,
    )


def decision_dtype(dtype: torch.dtype) -> torch.dtype:
    """Pooling and routing run in fp32 at least (fp64 stays fp64, for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _segments(num_source: int, num_tokens: int, block_size: int):
    """(first token, whole blocks, tokens of the partial last block) of the source, then the context."""
    for start, length in ((0, num_source), (num_source, num_tokens - num_source)):
        if length:
            yield start, *divmod(length, block_size)


def block_means(x: torch.Tensor, num_source: int, block_size: int) -> torch.Tensor:
    """Mean of each block's tokens, `[B, H, N, D]` -> `[B, H, nb, D]` in the decision dtype (source
    and context blocked apart). Whole blocks are summed through a view and each segment's partial
    last block on its own: no copy of x, and its backward is a broadcast (no scatter)."""
    b, dtype, parts = block_size, decision_dtype(x.dtype), []
    for start, whole, tail in _segments(num_source, x.shape[2], b):
        if whole:
            blocks = x[:, :, start:start + whole * b].unflatten(2, (whole, b))
            parts.append(blocks.sum(3, dtype=dtype) / b)
        if tail:
            end = start + whole * b
            parts.append(x[:, :, end:end + tail].sum(2, keepdim=True, dtype=dtype) / tail)
    return torch.cat(parts, dim=2)


def expand_blocks(xc: torch.Tensor, num_source: int, num_tokens: int, block_size: int) -> torch.Tensor:
    """Each token's block row: `[B, H, nb, D]` -> `[B, H, num_tokens, D]`, the inverse layout of
    block_means (a broadcast, whose backward sums each block's tokens)."""
    b = block_size
    if num_source % b == 0 and num_tokens % b == 0:
        # Whole blocks: one broadcast, which the compiler recomputes in the backward instead of
        # saving the [B, H, N, D] result (a slice and a concatenation made it save it).
        return xc[:, :, :, None, :].expand(-1, -1, -1, b, -1).flatten(2, 3)
    parts, first = [], 0
    for _, whole, tail in _segments(num_source, num_tokens, b):
        n = whole + (tail > 0)
        rows = xc[:, :, first:first + n, None, :].expand(-1, -1, -1, b, -1).flatten(2, 3)
        parts.append(rows[:, :, :whole * b + tail])
        first += n
    return torch.cat(parts, dim=2)


def token_blocks(num_source: int, num_context: int, block_size: int, device) -> torch.Tensor:
    """Block of each token, `[N]` long (source and context blocked apart); static shapes, no layout."""
    n_src, _ = segment_blocks(num_source, num_context, block_size)
    token = torch.arange(num_source + num_context, device=device)
    return torch.where(token < num_source, token, token + n_src * block_size - num_source) // block_size


def tile_permutation(frames: int, rows: int, cols: int, tile: tuple[int, int, int], device=None) -> torch.Tensor:
    """Permutation of a (frames, rows, cols) raster into contiguous tiles.

    `raster[perm]` lists tokens tile by tile (tiles in raster order, tokens inside a tile in raster
    order); edge tiles are smaller when the grid is not a multiple of the tile.
    """
    tf, th, tw = tile
    f = torch.arange(frames, device=device)[:, None, None]
    h = torch.arange(rows, device=device)[None, :, None]
    w = torch.arange(cols, device=device)[None, None, :]
    n_th = -(-rows // th)
    n_tw = -(-cols // tw)
    tile_id = ((f // tf) * n_th + h // th) * n_tw + w // tw
    inner = ((f % tf) * th + h % th) * tw + w % tw
    key = tile_id * (tf * th * tw) + inner
    return torch.argsort(key.flatten())


def sequence_tile_permutation(
    num_source: int, num_context: int, grid: tuple[int, int, int], tile: tuple[int, int, int], device=None
) -> torch.Tensor:
    """Tile permutation of a whole `[source | context]` sequence, each segment tiled on its own.

    `grid` is the source's (frames, rows, cols); the context shares rows and cols and may have
    another number of frames.
    """
    f, h, w = grid
    if f * h * w != num_source:
        raise ValueError(f"grid {tuple(grid)} holds {f * h * w} tokens but num_source is {num_source}")
    if num_context % (h * w):
        raise ValueError(f"context length {num_context} is not a whole number of {h}x{w} frames")
    src = tile_permutation(f, h, w, tile, device)
    if num_context == 0:
        return src
    ctx = tile_permutation(num_context // (h * w), h, w, tile, device) + num_source
    return torch.cat([src, ctx])
