"""The Triton ISA path against the PyTorch path (CPU: Triton's interpreter; GPU: the real kernels).

Tolerance by the FlashAttention rule: the kernels' error against an fp32 reference is at most twice
the error of the PyTorch path in the same precision, plus a small absolute floor; forward and
backward. Every random input comes from a generator seeded by the test's `seed` parameter.
GPU-only checks (tensor-core branch, dense kernels, CUDA graphs) are in test_isa_gpu.py.
"""

import logging

import pytest
import torch
from kernel_checks import forward_and_grads, max_err

from liveditor.isa import ISAConfig, dispatch, isa_attention
from liveditor.isa.reference import isa_attention_torch
from liveditor.isa.layout import token_blocks

pytest.importorskip("triton")
from liveditor.isa import ops  # noqa: E402
from liveditor.isa.triton_sparse import (  # noqa: E402
    exact_users,
    gather_exact_rows,
    pack_kept,
    scatter_exact_rows,
    sparse_backward,
    sparse_forward,
    unpack_kept,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The floor is one rounding of the output dtype (relative to the largest reference value): with tiny
# tensors the max error of either path is often a single rounding, so 2x alone is noise-bound.
ABS_FLOOR = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 1e-5}


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def draw(B, H, N, D, dtype, *, seed: int, requires_grad=False):
    g = generator(seed)
    return [torch.randn(B, H, N, D, device=DEVICE, generator=g).to(dtype).requires_grad_(requires_grad)
            for _ in range(3)]


def assert_flash_rule(kernel, low_precision, reference, floor, what):
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), kernel, low_precision, reference):
        kernel_err, torch_err = max_err(a, r), max_err(b, r)
        assert torch.isfinite(a).all(), f"{what} {name}: non-finite values"
        assert kernel_err <= 2 * torch_err + floor * max(1.0, r.abs().max().item()), (
            f"{what} {name}: kernel error {kernel_err:.3g} over 2 x PyTorch-path error {torch_err:.3g} + floor"
        )


# (B, H, L_src, L_ctx, D, block, dense_kernel): partial blocks, L_src != L_ctx, batch > 1, D 64/128,
# both exact-group kernels (Triton, and SDPA with and without a key mask).
CASES = [
    (2, 2, 100, 70, 64, 16, "triton"),
    (1, 3, 96, 64, 64, 16, "sdpa"),
    (2, 1, 90, 61, 64, 16, "sdpa"),
    (1, 2, 80, 112, 128, 16, "auto"),
    (2, 2, 144, 0, 64, 16, "auto"),
]


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("B,H,L_src,L_ctx,D,b,dense_kernel", CASES)
def test_forward_backward_match_pytorch_path(B, H, L_src, L_ctx, D, b, dense_kernel, seed):
    dtype = torch.bfloat16
    config = ISAConfig(block_size=b, select_ratio=0.4, exact_ratio=0.25)
    scale = D ** -0.5
    q, k, v = draw(B, H, L_src + L_ctx, D, dtype, seed=seed)
    grad_out = torch.randn(B, H, L_src + L_ctx, D, device=DEVICE, generator=generator(seed + 1000))
    kw = dict(num_source=L_src, config=config, scale=scale)
    kernel = forward_and_grads(ops.isa_attention_triton, q, k, v, grad_out, dense_kernel=dense_kernel, **kw)
    low = forward_and_grads(isa_attention_torch, q, k, v, grad_out, **kw)
    ref = forward_and_grads(isa_attention_torch, q.float(), k.float(), v.float(), grad_out, **kw)
    assert kernel[0].dtype == dtype and kernel[0].shape == q.shape
    assert_flash_rule(kernel, low, ref, ABS_FLOOR[dtype], f"seed {seed}, {dense_kernel} exact group")


@pytest.mark.parametrize("seed", [0])
def test_fp32_inputs_and_gate_match_float64_reference(seed):
    B, H, L_src, L_ctx, D, b = 2, 2, 75, 53, 64, 16
    config = ISAConfig(block_size=b, select_ratio=0.5, exact_ratio=0.3, sharpness="topk")
    q, k, v = draw(B, H, L_src + L_ctx, D, torch.float32, seed=seed)
    g = generator(seed + 1000)
    gate = torch.randn(B, L_src + L_ctx, device=DEVICE, generator=g)
    grad_out = torch.randn(q.shape, device=DEVICE, generator=g)
    kw = dict(num_source=L_src, config=config, scale=0.1)
    kernel = forward_and_grads(lambda *a, **k_: ops.isa_attention_triton(*a, gate=gate, **k_), q, k, v, grad_out, **kw)
    ref = forward_and_grads(lambda *a, **k_: isa_attention_torch(*a, gate=gate.double(), **k_),
                            q.double(), k.double(), v.double(), grad_out.double(), **kw)
    for name, a, r in zip(("out", "dq", "dk", "dv"), kernel, ref):
        assert max_err(a, r) <= 1e-4 * max(1.0, r.abs().max().item()), f"seed {seed}: {name}"


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("count_rounding,sharpness", [("ceil", "energy"), ("floor", "topk")])
def test_decisions_and_info_equal_pytorch_path(count_rounding, sharpness, seed):
    """Same decisions as the PyTorch path, with either count rounding (9 context blocks, 17 in all:
    ceil keeps 2 context blocks and routes 9 query blocks exactly, floor 1 and 8)."""
    B, H, L_src, L_ctx, D, b = 1, 2, 128, 144, 64, 16
    config = ISAConfig(block_size=b, count_rounding=count_rounding, sharpness=sharpness)
    q, k, v = draw(B, H, L_src + L_ctx, D, torch.bfloat16, seed=seed)
    _, info_kernel = ops.isa_attention_triton(q, k, v, L_src, config, scale=D ** -0.5, return_info=True)
    _, info_torch = isa_attention_torch(q, k, v, L_src, config, scale=D ** -0.5, return_info=True)
    n_sel, n_full = {"ceil": (2, 9), "floor": (1, 8)}[count_rounding]
    assert info_kernel.selected_context_blocks.shape[-1] == n_sel
    assert (info_kernel.exact_query_blocks.sum(-1) == n_full).all()
    assert torch.equal(info_kernel.selected_context_blocks, info_torch.selected_context_blocks)
    assert torch.equal(info_kernel.exact_query_blocks, info_torch.exact_query_blocks)
    assert info_kernel.flop_fraction == pytest.approx(info_torch.flop_fraction)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("nb,n_kv", [(9, 7), (100, 70)])
def test_exact_users_invert_the_exact_lists(nb, n_kv, seed):
    """Per key block (by id), its users in ascending order; none for a dropped block. 100 query
    blocks take two steps of the users kernel, 70 kept blocks three programs."""
    B, H, n_full = 2, 2, 3
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, H, nb, n_kv, generator=g) < 0.4
    order = torch.stack([torch.randperm(nb, generator=g) for _ in range(B * H)]).reshape(B, H, nb).to(torch.int32)
    kept = torch.stack([torch.randperm(nb, generator=g)[:n_kv] for _ in range(B * H)]).reshape(B, H, n_kv)
    for in_kernel in (False, True):
        users, n_users = exact_users(mask.to(torch.uint8), order, kept.to(torch.int32), n_full, in_kernel)
        for bi in range(B):
            for hi in range(H):
                exact_rows = set(order[bi, hi, :n_full].tolist())
                want = {blk: [] for blk in range(nb)}
                for j, blk in enumerate(kept[bi, hi].tolist()):
                    want[blk] = [i for i in range(nb) if (i in exact_rows and in_kernel)
                                 or (i not in exact_rows and mask[bi, hi, i, j])]
                got = {blk: users[bi, hi, blk, : n_users[bi, hi, blk]].tolist() for blk in range(nb)}
                assert got == want, f"seed {seed}"


@pytest.mark.parametrize("seed", [0])
def test_compiles_without_graph_breaks(seed):
    B, H, L_src, L_ctx, D, b = 1, 2, 64, 48, 64, 16
    config = ISAConfig(block_size=b)
    q, k, v = draw(B, H, L_src + L_ctx, D, torch.bfloat16, seed=seed, requires_grad=True)
    fn = torch.compile(lambda q, k, v: ops.isa_attention_triton(q, k, v, L_src, config, scale=D ** -0.5),
                       fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    out = fn(q, k, v)
    eager = ops.isa_attention_triton(q, k, v, L_src, config, scale=D ** -0.5)
    torch.testing.assert_close(out, eager, rtol=0, atol=2e-2)
    out.float().square().sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.parametrize("seed", [0])
def test_auto_backend_falls_back_once_per_reason_with_one_log_line(caplog, monkeypatch, seed):
    monkeypatch.setattr(dispatch, "_fallbacks_logged", set())  # as in a fresh process
    q, k, v = draw(1, 1, 40, 64, torch.float64, seed=seed)
    config = ISAConfig(block_size=16)
    with caplog.at_level(logging.INFO, logger="liveditor.isa.dispatch"):
        first = isa_attention(q, k, v, 20, config, backend="auto")
        isa_attention(q, k, v, 20, config, backend="auto")
    records = [r for r in caplog.records if r.name == "liveditor.isa.dispatch"]
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    # Off CUDA, auto decides on the device alone, without importing the kernels.
    assert "PyTorch path" in message and ("float64" if DEVICE == "cuda" else "not CUDA") in message
    assert "\n" not in message
    # CUDA inputs expected the kernels: a warning; elsewhere the PyTorch path is the normal one.
    assert records[0].levelno == (logging.WARNING if DEVICE == "cuda" else logging.INFO)
    assert torch.equal(first, isa_attention(q, k, v, 20, config, backend="torch"))


@pytest.mark.parametrize("seed", [0])
def test_triton_backend_refuses_what_it_cannot_run_and_matches_torch(seed):
    config = ISAConfig(block_size=16)
    q, k, v = draw(1, 1, 40, 64, torch.float64, seed=seed)
    with pytest.raises(ValueError, match="float64"):
        isa_attention(q, k, v, 20, config, backend="triton")
    q, k, v = draw(1, 1, 40, 64, torch.bfloat16, seed=seed)
    out = isa_attention(q, k, v, 20, config, backend="triton")
    torch.testing.assert_close(out, isa_attention(q, k, v, 20, config, backend="torch"), rtol=0, atol=2e-2)
    with pytest.raises(ValueError, match="dense kernel must be one of"):
        ops.isa_attention_triton(q, k, v, 20, config, dense_kernel="fa9")


@pytest.fixture(scope="module", params=[0], ids=lambda seed: f"seed{seed}")
def planned(request):
    """Inputs and the routing tables plan_isa makes for them, computed once for the module's tests."""
    B, H, L_src, L_ctx, D, b = 2, 2, 40, 24, 32, 16
    q, k, v = draw(B, H, L_src + L_ctx, D, torch.bfloat16, seed=request.param)
    config = ISAConfig(block_size=b, select_ratio=0.5, exact_ratio=0.5)
    plan = ops.plan_isa(q, k, v, L_src, config, D ** -0.5)
    return (q, k, v), plan, L_src, b


def _tables(plan) -> dict:
    return dict(pooled_k=plan.pooled_k, pooled_v=plan.pooled_v, kept=plan.kept32, query_order=plan.query_order,
                exact_lists=plan.exact_lists, exact_mask=plan.exact_mask)


def _transposed_copy(t):
    """Same values and shape, not contiguous (B = H = 2)."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


@pytest.mark.parametrize("name,bad,message", [
    ("kept", lambda t: t.long(), "kept must be torch.int32"),
    ("query_order", lambda t: t.long(), "query_order must be torch.int32"),
    ("exact_lists", lambda t: t.long(), "exact_lists must be torch.int32"),
    ("exact_mask", lambda t: t.bool(), "exact_mask must be torch.uint8"),
    ("pooled_k", lambda t: t.float(), "pooled_k must be torch.bfloat16"),
    ("kept", _transposed_copy, "kept must be contiguous"),
    ("query_order", _transposed_copy, "query_order must be contiguous"),
    ("exact_lists", _transposed_copy, "exact_lists must be contiguous"),
    ("exact_mask", _transposed_copy, "exact_mask must be contiguous"),
    ("pooled_v", _transposed_copy, "pooled_v must be contiguous"),
    ("query_order", lambda t: t[..., :-1].contiguous(), "query_order must have shape"),
])
def test_kernel_wrappers_refuse_tables_they_would_misread(planned, name, bad, message):
    (q, k, v), plan, L_src, b = planned
    tables = _tables(plan)
    tables[name] = bad(tables[name])
    args = (tables["pooled_k"], tables["pooled_v"], tables["kept"], tables["query_order"], tables["exact_lists"],
            tables["exact_mask"])
    n_full = plan.exact_query.sum(-1).max().item()
    with pytest.raises(ValueError, match=message) as forward_error:
        sparse_forward(q, k, v, *args, None, L_src, b, n_full, 0.1)
    assert "\n" not in str(forward_error.value)
    out, lse = torch.zeros_like(q), torch.zeros(q.shape[:3], device=q.device)
    with pytest.raises(ValueError, match=message):
        sparse_backward(torch.ones_like(q), q, k, v, *args, out, lse, False, L_src, b, n_full, 0.1)


def test_pack_and_row_wrappers_refuse_int64_and_strided_tables(planned):
    (q, k, v), plan, L_src, b = planned
    n_full = plan.exact_query.sum(-1).max().item()
    with pytest.raises(ValueError, match="query_order must be torch.int32"):
        gather_exact_rows(q, plan.query_order.long(), L_src, b, n_full)
    with pytest.raises(ValueError, match="selected must be torch.int32"):
        pack_kept(k, v, plan.selected, L_src, b)  # the long table ISAInfo reports
    with pytest.raises(ValueError, match="selected must be contiguous"):
        pack_kept(k, v, _transposed_copy(plan.selected32), L_src, b)
    with pytest.raises(ValueError, match="lse must be torch.float32"):
        sparse_backward(torch.ones_like(q), q, k, v, plan.pooled_k, plan.pooled_v, plan.kept32, plan.query_order,
                        plan.exact_lists, plan.exact_mask, torch.zeros_like(q), torch.zeros(q.shape[:3]).double(),
                        False, L_src, b, n_full, 0.1)


@pytest.mark.parametrize("exact_from_dense", [False, True])
def test_backward_reads_strided_dout_and_out_as_dense(planned, exact_from_dense):
    """The backward kernels read dout and out through their strides (the model's dout is a
    transposed view): the same gradients, bit for bit, as from contiguous copies."""
    (q, k, v), plan, L_src, b = planned
    n_full = int(plan.exact_query.sum(-1).max())
    tables = tuple(_tables(plan).values())
    exact_out = gather_exact_rows(q, plan.query_order, L_src, b, n_full) if exact_from_dense else None
    out, lse = sparse_forward(q, k, v, *tables, exact_out, L_src, b, n_full, 0.1)
    dout = torch.randn(q.shape, device=DEVICE, generator=generator(7)).to(q.dtype)
    split = (exact_from_dense, L_src, b, n_full, 0.1)
    dense = sparse_backward(dout, q, k, v, *tables, out, lse, *split)
    strided = sparse_backward(_transposed_copy(dout), q, k, v, *tables, _transposed_copy(out), lse, *split)
    for a, r in zip(strided, dense):
        assert torch.equal(a, r)


def test_unpack_kept_zeroes_the_dropped_context_blocks(planned):
    """Gradients of the packed kept keys/values back at their tokens, every dropped context block
    exactly zero (written by the kernel: the outputs are not zero-filled first); the last context
    block is partial."""
    (q, k, v), plan, L_src, b = planned
    N = q.shape[2]
    k_packed, v_packed = pack_kept(k, v, plan.selected32, L_src, b)
    torch.full_like(k, float("nan"))  # leave non-zero garbage where the outputs may be allocated
    dk, dv = unpack_kept(k_packed, v_packed, plan.selected32, L_src, b, N)
    kept_block = torch.zeros(plan.exact_query.shape, dtype=torch.bool, device=q.device).scatter_(-1, plan.kept, True)
    kept_token = kept_block[:, :, token_blocks(L_src, N - L_src, b, q.device)][..., None]  # [B, H, N, 1]
    assert not kept_token.all(), "the case must drop a context block"
    assert torch.equal(dk, torch.where(kept_token, k, torch.zeros_like(k)))
    assert torch.equal(dv, torch.where(kept_token, v, torch.zeros_like(v)))


def test_backward_leaves_the_dense_kernels_dq_rows_zero(planned):
    """With the exact group on a dense kernel, sparse_backward's dq is zero on that group's rows
    (its gradient comes from the dense kernel's backward) and, elsewhere, what it is when the
    kernels compute the exact group themselves; not zero-filled first."""
    (q, k, v), plan, L_src, b = planned
    n_full = int(plan.exact_query.sum(-1).max())
    N = q.shape[2]
    tables = tuple(_tables(plan).values())
    dout = torch.randn(q.shape, device=DEVICE, generator=generator(3)).to(q.dtype)
    out, lse = sparse_forward(q, k, v, *tables, None, L_src, b, n_full, 0.1)
    dq_all = sparse_backward(dout, q, k, v, *tables, out, lse, False, L_src, b, n_full, 0.1)[0]
    exact_out = gather_exact_rows(out, plan.query_order, L_src, b, n_full)
    out_dense, lse_dense = sparse_forward(q, k, v, *tables, exact_out, L_src, b, n_full, 0.1)
    torch.full_like(q, float("nan"))  # leave non-zero garbage where dq may be allocated
    dq = sparse_backward(dout, q, k, v, *tables, out_dense, lse_dense, True, L_src, b, n_full, 0.1)[0]
    exact_token = plan.exact_query[:, :, token_blocks(L_src, N - L_src, b, q.device)][..., None]
    assert torch.equal(dq, torch.where(exact_token, torch.zeros_like(dq_all), dq_all))


def test_scatter_exact_rows_zeroes_the_taylor_rows(planned):
    """The exact group's rows at their tokens, every other token exactly zero (written by the
    kernel: the output is not zero-filled first)."""
    (q, k, v), plan, L_src, b = planned
    n_full = int(plan.exact_query.sum(-1).max())
    N = q.shape[2]
    packed = gather_exact_rows(q, plan.query_order, L_src, b, n_full)
    torch.full_like(q, float("nan"))  # leave non-zero garbage where the output may be allocated
    out = scatter_exact_rows(packed, plan.query_order, L_src, b, N)
    exact_token = plan.exact_query[:, :, token_blocks(L_src, N - L_src, b, q.device)]  # [B, H, N]
    assert torch.equal(out, torch.where(exact_token[..., None], q, torch.zeros_like(q)))
