"""Wan's flow-matching objective.

A clean latent x0 and Gaussian noise are mixed as x_t = (1 - t) x0 + t noise for t in [0, 1]
(t = 1 is pure noise); the model predicts the velocity noise - x0 from (x_t, 1000 t). Training
times are drawn uniformly and shifted towards the noisy end as Wan shifts its sampling schedule:
t = s u / (1 + (s - 1) u), the same map the flow-matching schedulers apply to their sigmas.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000  # the model sees timestep = 1000 t, as the schedulers' timesteps


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's timestep shift: u in [0, 1] -> s u / (1 + (s - 1) u); shift 1 is the identity."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def flow_matching_pair(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor):
    """(x_t, velocity target) for clean latents x0 `[B, ...]`, noise like x0 and t `[B]`."""
    t = sigmas.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - t) * x0 + t * noise, noise - x0


def flow_matching_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32 (the prediction may come out of bf16 autocast)."""
    return torch.mean((prediction.float() - target.float()) ** 2)
