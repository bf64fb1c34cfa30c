"""Ulysses sequence parallelism for the LIVEditor transformer.

The ranks of one sequence group each hold a contiguous shard of the `[source | context]` tokens
through every block (modulation, cross-attention and FFN are per token). Self-attention needs the
whole sequence, so around it q, k, v are exchanged all-to-all from token shards to head shards:
each rank then runs ISA or dense attention unchanged on `heads / degree` heads over all tokens
(ISA routes per head), and the output goes back to token shards before the output projection.

Collectives are torch.distributed's functional ones (`_functional_collectives`, the API diffusers'
own context parallelism uses): differentiable, traceable by torch.compile, and on any backend
(NCCL on GPUs, gloo on CPU for the tests). diffusers' `ContextParallelConfig` cannot host the
processor: its Ulysses exchange lives inside the attention dispatcher's registered backends, and
ISA is not one (registering one is private API).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class SequenceShard:
    """The layout of one rank in a Ulysses group: `rank` of `degree` ranks in `group`, holding
    tokens `[rank * n, (rank + 1) * n)` of the sequence, `n = num_tokens / degree`."""

    group: dist.ProcessGroup
    rank: int
    degree: int

    @staticmethod
    def of(group: dist.ProcessGroup) -> "SequenceShard":
        return SequenceShard(group, dist.get_rank(group), dist.get_world_size(group))

    def check(self, num_heads: int, num_tokens: int | None = None) -> None:
        """One-line errors (InvalidArgumentError, a ValueError) for layouts Ulysses cannot shard."""
        if num_heads % self.degree:
            raise InvalidArgumentError(
                f"Ulysses degree {self.degree} must divide the {num_heads} attention heads")
        if num_tokens is not None and num_tokens % self.degree:
            raise InvalidArgumentError(
                f"Ulysses degree {self.degree} must divide the {num_tokens} tokens of the [source | context] "
                f"sequence (change the frame count or size)")

    def local(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous shard of `x` along `dim`."""
        return x.chunk(self.degree, dim=dim)[self.rank]

    def tokens_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, n, H, D]` (local tokens, all heads) -> `[B, N, H / degree, D]` (all tokens, local heads)."""
        b, n, h, d = x.shape
        x = x.reshape(b, n, self.degree, h // self.degree, d).permute(2, 1, 0, 3, 4).contiguous()
        x = _wait(funcol.all_to_all_single_autograd(x, None, None, self.group))  # chunk p <- rank p's tokens
        return x.permute(2, 0, 1, 3, 4).reshape(b, self.degree * n, h // self.degree, d)

    def heads_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, N, h, D]` (all tokens, local heads) -> `[B, N / degree, h * degree, D]`."""
        b, big_n, h, d = x.shape
        n = big_n // self.degree
        x = x.reshape(b, self.degree, n, h, d).permute(1, 0, 2, 3, 4).contiguous()
        x = _wait(funcol.all_to_all_single_autograd(x, None, None, self.group))  # chunk p <- rank p's heads
        return x.permute(1, 2, 0, 3, 4).reshape(b, n, self.degree * h, d)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """All ranks' shards of `x` concatenated along `dim`, in rank order."""
        return all_gather(x, dim, self.group)


# torch 2.13 renamed all_gather_tensor_autograd to all_gather_single_autograd (the old name warns);
# torch 2.4-2.12 have only the old name.
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Every rank's `x` of `group` concatenated along `dim`, in rank order (differentiable)."""
    return _wait(_all_gather_autograd(x.contiguous(), dim, group))


def _wait(x: torch.Tensor) -> torch.Tensor:
    return funcol.wait_tensor(x) if isinstance(x, funcol.AsyncCollectiveTensor) else x
