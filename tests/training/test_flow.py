"""Wan's flow-matching objective."""

import pytest
import torch

from liveditor.pipelines import flow_unipc_scheduler
from liveditor.training.flow import flow_matching_loss, flow_matching_pair, shift_sigmas


def test_shift_matches_the_inference_scheduler():
    # Training noise levels are shifted the way the UniPC flow scheduler shifts its sigmas.
    scheduler = flow_unipc_scheduler(flow_shift=3.0)
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas[:-1].double()
    unshifted = sigmas / (3.0 - 2.0 * sigmas)  # inverse of s u / (1 + (s - 1) u)
    torch.testing.assert_close(shift_sigmas(unshifted, 3.0), sigmas)


def test_shift_properties():
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shift_sigmas(u, 1.0), u)
    shifted = shift_sigmas(u, 3.0)
    assert torch.all(shifted >= u) and shifted.max() <= 1.0
    ends = shift_sigmas(torch.tensor([0.0, 1.0]), 5.0)
    assert ends.tolist() == [0.0, 1.0]
    t = shift_sigmas(torch.rand(4096, generator=torch.Generator().manual_seed(1)), 3.0)
    assert t.min() > 0 and t.max() < 1 and t.mean() > 0.6  # shift 3 puts most weight at high noise


def test_pair_interpolates_and_the_velocity_recovers_x0():
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(3, 4, 2, 5, 5, generator=g), torch.randn(3, 4, 2, 5, 5, generator=g)
    t = torch.tensor([0.0, 0.3, 1.0])
    x_t, v = flow_matching_pair(x0, noise, t)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[2], noise[2])
    torch.testing.assert_close(x_t[1], 0.7 * x0[1] + 0.3 * noise[1])
    torch.testing.assert_close(x_t - t.view(-1, 1, 1, 1, 1) * v, x0)  # what the sampler inverts


def test_loss_is_fp32_mse():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 8, generator=g).bfloat16(), torch.randn(2, 8, generator=g)
    loss = flow_matching_loss(a, b)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(((a.float() - b) ** 2).mean().item())
