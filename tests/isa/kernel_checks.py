"""Helpers shared by the kernel tests (CPU interpreter and GPU): errors and gradients."""

import torch


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def forward_and_grads(fn, q, k, v, grad_out, **kwargs):
    """(out, dq, dk, dv) of `fn(q, k, v, **kwargs)` for the output gradient `grad_out`."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))
    return (out, *grads)
