"""The Triton ISA path against the PyTorch path (CPU: Triton's interpreter; GPU: the real kernels).

Tolerance by the FlashAttention rule: the kernels' error against an fp32 reference is at most twice
the error of the PyTorch path in the same precision, plus a small absolute floor; forward and
backward. Inputs are fresh random draws on every run.
"""

import logging

import pytest
import torch

from liveditor.isa import ISAConfig, isa_attention
from liveditor.isa.reference import isa_attention_torch, pool_blocks
from liveditor.isa.layout import block_layout

pytest.importorskip("triton")
from liveditor.isa import ops  # noqa: E402
from liveditor.isa.triton_sparse import exact_users  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The floor is one rounding of the output dtype (relative to the largest reference value): with tiny
# tensors the max error of either path is often a single rounding, so 2x alone is noise-bound.
ABS_FLOOR = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 1e-5}


def draw(B, H, N, D, dtype, requires_grad=False):
    return [torch.randn(B, H, N, D, device=DEVICE).to(dtype).requires_grad_(requires_grad) for _ in range(3)]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def forward_and_grads(fn, q, k, v, grad_out, **kwargs):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))
    return (out, *grads)


def assert_flash_rule(kernel, low_precision, reference, floor, what):
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), kernel, low_precision, reference):
        kernel_err, torch_err = max_err(a, r), max_err(b, r)
        assert torch.isfinite(a).all(), f"{what} {name}: non-finite values"
        assert kernel_err <= 2 * torch_err + floor * max(1.0, r.abs().max().item()), (
            f"{what} {name}: kernel error {kernel_err:.3g} over 2 x PyTorch-path error {torch_err:.3g} + floor"
        )


# (B, H, L_src, L_ctx, D, block, exact_kernel): partial blocks, L_src != L_ctx, batch > 1, D 64/128,
# both exact-group kernels (dense needs a whole number of context blocks or a mask).
CASES = [
    (2, 2, 100, 70, 64, 16, "triton"),
    (1, 3, 96, 64, 64, 16, "dense"),
    (2, 1, 90, 61, 64, 16, "dense"),
    (1, 2, 80, 112, 128, 16, "auto"),
    (2, 2, 144, 0, 64, 16, "auto"),
]


@pytest.mark.parametrize("B,H,L_src,L_ctx,D,b,exact_kernel", CASES)
def test_forward_backward_match_pytorch_path(B, H, L_src, L_ctx, D, b, exact_kernel):
    dtype = torch.bfloat16
    config = ISAConfig(block_size=b, select_ratio=0.4, exact_ratio=0.25)
    scale = D ** -0.5
    q, k, v = draw(B, H, L_src + L_ctx, D, dtype)
    grad_out = torch.randn(B, H, L_src + L_ctx, D, device=DEVICE)
    kw = dict(num_source=L_src, config=config, scale=scale)
    kernel = forward_and_grads(ops.isa_attention_triton, q, k, v, grad_out, exact_kernel=exact_kernel, **kw)
    low = forward_and_grads(isa_attention_torch, q, k, v, grad_out, **kw)
    ref = forward_and_grads(isa_attention_torch, q.float(), k.float(), v.float(), grad_out, **kw)
    assert kernel[0].dtype == dtype and kernel[0].shape == q.shape
    assert_flash_rule(kernel, low, ref, ABS_FLOOR[dtype], f"{exact_kernel} exact group")


def test_fp32_inputs_and_gate_match_float64_reference():
    B, H, L_src, L_ctx, D, b = 2, 2, 75, 53, 64, 16
    config = ISAConfig(block_size=b, select_ratio=0.5, exact_ratio=0.3, sharpness="topk")
    q, k, v = draw(B, H, L_src + L_ctx, D, torch.float32)
    gate = torch.randn(B, L_src + L_ctx, device=DEVICE)
    grad_out = torch.randn_like(q)
    kw = dict(num_source=L_src, config=config, scale=0.1)
    kernel = forward_and_grads(lambda *a, **k_: ops.isa_attention_triton(*a, gate=gate, **k_), q, k, v, grad_out, **kw)
    ref = forward_and_grads(lambda *a, **k_: isa_attention_torch(*a, gate=gate.double(), **k_),
                            q.double(), k.double(), v.double(), grad_out.double(), **kw)
    for name, a, r in zip(("out", "dq", "dk", "dv"), kernel, ref):
        assert max_err(a, r) <= 1e-4 * max(1.0, r.abs().max().item()), name


def test_decisions_and_info_equal_pytorch_path():
    B, H, L_src, L_ctx, D, b = 2, 3, 128, 160, 64, 16
    config = ISAConfig(block_size=b)
    q, k, v = draw(B, H, L_src + L_ctx, D, torch.bfloat16)
    _, info_kernel = ops.isa_attention_triton(q, k, v, L_src, config, scale=D ** -0.5, return_info=True)
    _, info_torch = isa_attention_torch(q, k, v, L_src, config, scale=D ** -0.5, return_info=True)
    assert torch.equal(info_kernel.selected_context_blocks, info_torch.selected_context_blocks)
    assert torch.equal(info_kernel.exact_query_blocks, info_torch.exact_query_blocks)
    assert info_kernel.flop_fraction == pytest.approx(info_torch.flop_fraction)


def test_pooling_kernel_matches_reference_and_reads_strided_inputs():
    B, H, L_src, L_ctx, D, b = 2, 3, 77, 50, 64, 16
    N = L_src + L_ctx
    # [B, N, H, D] transposed to [B, H, N, D]: the layout attention layers hand over.
    q, k, v = (torch.randn(B, N, H, D, device=DEVICE).transpose(1, 2).requires_grad_() for _ in range(3))
    pooled = ops.isa_pool(q, k, v, L_src, b)
    layout = block_layout(L_src, L_ctx, b, q.device)
    expected = [pool_blocks(x, layout) for x in (q, k, v)]
    for got, want in zip(pooled, expected):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    weights = [torch.randn_like(p) for p in pooled]
    got = torch.autograd.grad(sum((p * w).sum() for p, w in zip(pooled, weights)), (q, k, v))
    want = torch.autograd.grad(sum((p * w).sum() for p, w in zip(expected, weights)), (q, k, v))
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_exact_users_invert_the_exact_lists():
    B, H, nb, n_kv, n_full = 2, 2, 9, 7, 3
    mask = torch.rand(B, H, nb, n_kv) < 0.4
    order = torch.stack([torch.randperm(nb) for _ in range(B * H)]).reshape(B, H, nb).to(torch.int32)
    for in_kernel in (False, True):
        users, n_users = exact_users(mask.to(torch.uint8), order, n_full, in_kernel)
        exact_rows = set()
        for bi in range(B):
            for hi in range(H):
                exact_rows = set(order[bi, hi, :n_full].tolist())
                for j in range(n_kv):
                    want = [i for i in range(nb) if (i in exact_rows and in_kernel)
                            or (i not in exact_rows and mask[bi, hi, i, j])]
                    got = users[bi, hi, j, : n_users[bi, hi, j]].tolist()
                    assert got == want


def test_compiles_without_graph_breaks():
    B, H, L_src, L_ctx, D, b = 1, 2, 64, 48, 64, 16
    config = ISAConfig(block_size=b)
    q, k, v = draw(B, H, L_src + L_ctx, D, torch.bfloat16, requires_grad=True)
    fn = torch.compile(lambda q, k, v: ops.isa_attention_triton(q, k, v, L_src, config, scale=D ** -0.5),
                       fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    out = fn(q, k, v)
    eager = ops.isa_attention_triton(q, k, v, L_src, config, scale=D ** -0.5)
    torch.testing.assert_close(out, eager, rtol=0, atol=2e-2)
    out.float().square().sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))


def test_backend_choice(caplog):
    q, k, v = draw(1, 1, 40, 64, torch.float64)
    config = ISAConfig(block_size=16)
    with pytest.raises(ValueError, match="triton"):
        isa_attention(q, k, v, 20, config, backend="triton")
    with caplog.at_level(logging.INFO, logger="liveditor.isa.dispatch"):
        isa_attention(q, k, v, 20, config, backend="auto")
        isa_attention(q, k, v, 20, config, backend="auto")
    fallbacks = [r for r in caplog.records if "PyTorch path" in r.getMessage()]
    assert len(fallbacks) <= 1  # said once per process (an earlier test may have said it already)
    q, k, v = draw(1, 1, 40, 64, torch.bfloat16)
    out = isa_attention(q, k, v, 20, config, backend="triton")
    torch.testing.assert_close(out, isa_attention(q, k, v, 20, config, backend="torch"), rtol=0, atol=2e-2)
    with pytest.raises(ValueError, match="exact_kernel"):
        ops.isa_attention_triton(q, k, v, 20, config, exact_kernel="fa9")



@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_cuda_graph_capture_replays_on_new_inputs():
    """No host sync in the hot path: the whole operator (routing included) captures and replays."""
    B, H, L_src, L_ctx, D, b = 1, 2, 256, 192, 64, 32
    config = ISAConfig(block_size=b)
    q, k, v = draw(B, H, L_src + L_ctx, D, torch.bfloat16)
    run = lambda: ops.isa_attention_triton(q, k, v, L_src, config, scale=D ** -0.5)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: kernel compilation and the dense-kernel choice
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for x, fresh in zip((q, k, v), draw(B, H, L_src + L_ctx, D, torch.bfloat16)):
        x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, run(), rtol=0, atol=1e-2)
