"""ISA's knobs and what a call decided."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SHARPNESS_STATISTICS = ("energy", "topk")
TOKEN_ORDERS = ("raster", "tile")
COUNT_ROUNDINGS = ("ceil", "floor")
BLOCKINGS = ("separate", "joint")


@dataclass(frozen=True)
class ISAConfig:
    """Knobs of In-context Sparse Attention (defaults: the paper's).

    block_size: tokens per query/key block.
    select_ratio: fraction of context key blocks kept for every query (the rest are dropped).
    full_ratio: fraction of query blocks (the sharpest) routed to exact attention.
    exact_ratio: fraction of kept key blocks that a flat query block attends to exactly; the
        others enter through their mean key (0th-order Taylor term).
    sharpness: "energy" (sum of squared coarse probabilities, the paper's variance ranking) or
        "topk" (sum of the top coarse probabilities, the released code's statistic).
    token_order: "raster" keeps the model's (frame, row, column) order; "tile" permutes each
        segment into contiguous spatio-temporal tiles before blocking (needs the latent grid).
    tile: (frames, rows, columns) of one tile for token_order="tile".
    count_rounding: how ratio x block count becomes a whole number of blocks. "ceil": the kept
        context blocks and the exact query blocks round up (never less than the ratio asks), the
        exact key blocks per Taylor block and the top-k of the sharpness statistic round down.
        "floor": all four round down, as the released code does (`int()`). Every count is then
        clamped to [1, available].
    blocking: "separate" pads source and context to whole blocks apart (padding carries no
        weight). "joint" emulates the released code's blocking of the concatenated sequence (one
        block straddles the boundary, padded keys keep softmax weight), in the PyTorch path only,
        to measure the difference (docs/isa-semantics.md, "Joint blocking").
    """

    block_size: int = 64
    select_ratio: float = 0.125
    full_ratio: float = 0.5
    exact_ratio: float = 0.0625
    sharpness: str = "energy"
    token_order: str = "raster"
    tile: tuple[int, int, int] = (4, 4, 4)
    count_rounding: str = "ceil"
    blocking: str = "separate"

    def __post_init__(self):
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"ISAConfig.block_size must be a positive int, got {self.block_size!r}")
        for name in ("select_ratio", "full_ratio", "exact_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"ISAConfig.{name} must be in (0, 1], got {value!r}")
        if self.sharpness not in SHARPNESS_STATISTICS:
            raise ValueError(f"ISAConfig.sharpness must be one of {SHARPNESS_STATISTICS}, got {self.sharpness!r}")
        if self.token_order not in TOKEN_ORDERS:
            raise ValueError(f"ISAConfig.token_order must be one of {TOKEN_ORDERS}, got {self.token_order!r}")
        if self.count_rounding not in COUNT_ROUNDINGS:
            raise ValueError(f"ISAConfig.count_rounding must be one of {COUNT_ROUNDINGS}, got {self.count_rounding!r}")
        if self.blocking not in BLOCKINGS:
            raise ValueError(f"ISAConfig.blocking must be one of {BLOCKINGS}, got {self.blocking!r}")
        tile = tuple(self.tile)
        if len(tile) != 3 or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tile):
            raise ValueError(f"ISAConfig.tile must be three positive ints (frames, rows, columns), got {self.tile!r}")
        object.__setattr__(self, "tile", tile)


@dataclass
class ISAInfo:
    """What one ISA call decided (batch-first, per head)."""

    selected_context_blocks: torch.Tensor  # [B, H, n_sel] long, context block numbers
    exact_query_blocks: torch.Tensor  # [B, H, nb] bool, True = routed to exact attention
    num_source_blocks: int
    num_context_blocks: int
    flop_fraction: float  # FLOPs computed / dense attention FLOPs, mean over batch and heads


def ceil_count(ratio: float, n: int) -> int:
    """ceil(ratio * n), robust to binary fractions such as 0.1 * 30."""
    return math.ceil(ratio * n - 1e-6)


def floor_count(ratio: float, n: int) -> int:
    """floor(ratio * n), robust to binary fractions such as 0.29 * 100 (int() would give 28)."""
    return math.floor(ratio * n + 1e-6)


def segment_blocks(num_source: int, num_context: int, block_size: int) -> tuple[int, int]:
    """(source blocks, context blocks): each segment is padded to whole blocks on its own."""
    return -(-num_source // block_size), -(-num_context // block_size)


def joint_blocks(num_source: int, num_context: int, block_size: int) -> tuple[int, int]:
    """(source blocks, context blocks) of the released code's blocking of `[source | context]`:
    the source blocks are the whole ones, every later block (the straddling one included) counts
    as context."""
    n_src = num_source // block_size
    return n_src, -(-(num_source + num_context) // block_size) - n_src


@dataclass(frozen=True)
class BlockCounts:
    """How many blocks each ISA stage keeps for a given sequence split."""

    num_source_blocks: int
    num_context_blocks: int
    num_selected: int  # context blocks kept
    num_full: int  # query blocks routed to exact attention
    num_exact: int  # exact key blocks per flat query block
    topk_sharpness: int  # k of the "topk" sharpness statistic

    @property
    def num_blocks(self) -> int:
        return self.num_source_blocks + self.num_context_blocks

    @property
    def num_kept(self) -> int:
        return self.num_source_blocks + self.num_selected


def block_counts(num_source: int, num_context: int, config: ISAConfig) -> BlockCounts:
    """Every block count of one ISA call (the one place they are computed; see docs/isa-semantics.md)."""
    blocks = joint_blocks if config.blocking == "joint" else segment_blocks
    n_src, n_ctx = blocks(num_source, num_context, config.block_size)
    nb = n_src + n_ctx
    keep_count = floor_count if config.count_rounding == "floor" else ceil_count

    def clamp(count: int, available: int) -> int:
        return min(available, max(1, count))

    n_sel = clamp(keep_count(config.select_ratio, n_ctx), n_ctx) if n_ctx else 0
    # Key blocks a Taylor query block chooses among. Joint: the kept tokens (every source token,
    # then the selected blocks) are blocked again from their start.
    n_kv = (-(-num_source // config.block_size) if config.blocking == "joint" else n_src) + n_sel
    return BlockCounts(
        num_source_blocks=n_src,
        num_context_blocks=n_ctx,
        num_selected=n_sel,
        num_full=clamp(keep_count(config.full_ratio, nb), nb),
        num_exact=clamp(floor_count(config.exact_ratio, n_kv), n_kv),
        topk_sharpness=clamp(floor_count(config.exact_ratio, n_src), n_src),
    )
