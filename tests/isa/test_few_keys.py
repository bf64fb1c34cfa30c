"""few_key_attention: the Triton kernels for short key sequences (text cross-attention) against an
fp64 reference, by the FlashAttention rule (the kernels' error at most twice SDPA's in the same
precision, plus one rounding of the output dtype); backend choice, autocast, validation, the custom
ops' fakes and torch.compile. On a CPU the kernels run on Triton's interpreter (tests/conftest.py);
every random input comes from a generator seeded by `seed`.
"""

import pytest
import torch
import torch.nn.functional as F

from liveditor.isa import few_key_attention
from liveditor.isa.dispatch import resolve_few_key_backend

pytest.importorskip("triton")
from liveditor.isa import triton_few_keys  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ABS_FLOOR = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 1e-5}


def draw(B, N, L, H, D, dtype, seed):
    """q `[B, N, H, D]`, k and v `[B, L, H, D]` laid out as the model makes them (views of the
    projections' output; k and v the strided halves of a fused to_kv), and dout."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(B, N, H * D, device=DEVICE, generator=g).to(dtype).unflatten(2, (H, D))
    kv = torch.randn(B, L, 2 * H * D, device=DEVICE, generator=g).to(dtype)
    k, v = (x.unflatten(2, (H, D)) for x in kv.chunk(2, dim=-1))
    dout = torch.randn(B, N, H, D, device=DEVICE, generator=g).to(dtype)
    return q, k, v, dout


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def forward_and_grads(fn, q, k, v, dout):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, dout.to(out.dtype)))


def assert_flash_rule(kernel, low_precision, reference, dtype, what):
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), kernel, low_precision, reference):
        assert a.dtype == b.dtype and a.shape == r.shape, f"{what} {name}: {a.dtype} {tuple(a.shape)}"
        kernel_err, torch_err = (a.double() - r).abs().max().item(), (b.double() - r).abs().max().item()
        floor = ABS_FLOOR[dtype] * max(1.0, r.abs().max().item())
        assert kernel_err <= 2 * torch_err + floor, (
            f"{what} {name}: kernel error {kernel_err:.3g} over 2 x SDPA's {torch_err:.3g} + floor {floor:.3g}")


# (B, N, L, H, D): the tiny model's layout (4 heads of 64, a padded prompt), query counts that leave a
# partial tile, key counts that are not powers of two (1 and 64: the limits), a head dim under a tile.
SHAPES = [(2, 300, 24, 4, 64), (1, 130, 1, 2, 32), (2, 70, 33, 2, 40), (1, 64, 64, 1, 128)]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("B,N,L,H,D", SHAPES)
def test_kernels_match_the_reference_forward_and_backward(B, N, L, H, D, dtype, seed):
    q, k, v, dout = draw(B, N, L, H, D, dtype, seed)
    reference = forward_and_grads(sdpa, *(x.double() for x in (q, k, v, dout)))
    same_precision = forward_and_grads(sdpa, q, k, v, dout)
    kernels = forward_and_grads(lambda *x: few_key_attention(*x, backend="triton"), q, k, v, dout)
    assert_flash_rule(kernels, same_precision, reference, dtype, f"B={B} N={N} L={L} H={H} D={D} {dtype}")


@pytest.mark.cuda
@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_tensor_core_kernels_at_the_training_shape(dtype, seed):
    """The tensor-core branch (the interpreter upcasts every dot) at the tiny model's training layout:
    2,048 queries, 24 keys, 4 heads of 64, a batch large enough for several programs per SM."""
    q, k, v, dout = draw(8, 2048, 24, 4, 64, dtype, seed)
    reference = forward_and_grads(sdpa, *(x.double() for x in (q, k, v, dout)))
    same_precision = forward_and_grads(sdpa, q, k, v, dout)
    kernels = forward_and_grads(lambda *x: few_key_attention(*x, backend="triton"), q, k, v, dout)
    assert_flash_rule(kernels, same_precision, reference, dtype, f"training shape {dtype}")


@pytest.mark.parametrize("seed", [0])
def test_backward_is_the_same_whatever_the_programs_per_head(seed):
    """dk/dv are summed over programs that each cover a run of query tiles (more programs when the
    batch is small): 1, 2 or 3 runs over 3 tiles give the same gradients, to fp32 summation order."""
    q, k, v, dout = draw(2, 300, 24, 2, 64, torch.bfloat16, seed)
    scale = 64 ** -0.5
    out, lse = triton_few_keys.few_keys_forward(q, k, v, scale)
    one = triton_few_keys.few_keys_backward(dout, q, k, v, out, lse, scale, splits=1)
    for splits in (2, 3):
        other = triton_few_keys.few_keys_backward(dout, q, k, v, out, lse, scale, splits=splits)
        assert torch.equal(one[0], other[0]), f"dq with {splits} programs per head"
        for name, a, b in zip(("dk", "dv"), one[1:], other[1:]):
            assert (a.float() - b.float()).abs().max().item() <= 2.0 ** -8 * b.float().abs().max().item(), (
                f"{name} with {splits} programs per head")


@pytest.mark.parametrize("seed", [0])
def test_auto_runs_the_kernels_only_where_they_apply(seed):
    q, k, _, _ = draw(1, 16, 24, 2, 64, torch.bfloat16, seed)
    long_k = torch.randn(1, 65, 2, 64, device=DEVICE).to(torch.bfloat16)
    expected = "triton" if DEVICE == "cuda" else "torch"  # the interpreter is for tests: "auto" stays on SDPA
    assert resolve_few_key_backend("auto", q, k) == expected
    assert resolve_few_key_backend("auto", q, long_k) == "torch"
    assert resolve_few_key_backend("torch", q, k) == "torch"
    assert resolve_few_key_backend("triton", q, k) == "triton"
    with pytest.raises(ValueError, match="65 keys are over 64"):
        resolve_few_key_backend("triton", q, long_k)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_few_key_backend("cudnn", q, k)


@pytest.mark.parametrize("seed", [0])
def test_autocast_computes_in_its_dtype_as_sdpa_does(seed):
    """Under autocast the inputs are cast to its dtype first (SDPA's autocast policy): the result is
    the one of the cast inputs, in that dtype, on both backends."""
    q, k, v, _ = draw(1, 40, 7, 2, 32, torch.float32, seed)
    for backend in ("torch", "triton"):
        cast = few_key_attention(*(x.to(torch.bfloat16) for x in (q, k, v)), backend=backend)
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            out = few_key_attention(q, k, v, backend=backend)
        assert out.dtype == torch.bfloat16 and torch.equal(out, cast), backend


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((1, 8, 2, 16), (1, 4, 3, 16), (1, 4, 3, 16)), "key and value must be"),
        (((1, 8, 2, 16), (1, 4, 2, 16), (1, 5, 2, 16)), "key and value must be"),
        (((1, 8, 2, 16), (1, 0, 2, 16), (1, 0, 2, 16)), "need queries, keys"),
        (((8, 2, 16), (4, 2, 16), (4, 2, 16)), "must be a floating"),
    ],
)
def test_bad_inputs_get_a_clear_error(shapes, message):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=g) for s in shapes]
    with pytest.raises(ValueError, match=message):
        few_key_attention(*tensors)


@pytest.mark.parametrize("seed", [0])
def test_custom_ops_fakes_and_autograd_match_the_kernels(seed):
    q, k, v, dout = draw(2, 70, 24, 2, 64, torch.bfloat16, seed)
    out, lse = triton_few_keys.few_keys_forward(q, k, v, 0.125)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    checks = {
        "forward": (triton_few_keys.few_key_attention_op, (*leaves, 0.125)),
        "backward": (triton_few_keys.few_key_attention_backward_op, (dout, q, k, v, out, lse, 0.125)),
    }
    for name, (op, args) in checks.items():
        results = torch.library.opcheck(op, args, test_utils=("test_faketensor", "test_autograd_registration"))
        failed = {check: result for check, result in results.items() if result != "SUCCESS"}
        assert not failed, f"{name}: {failed}"


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compiled_equals_eager_under_autocast(backend, seed):
    """torch.compile(fullgraph) traces the backend choice and the autocast cast, and the ops through
    their fakes (it asserts the real strides against them); a training step runs under autocast."""
    q, k, v, dout = draw(2, 70, 24, 2, 64, torch.float32, seed)

    def fn(q, k, v):
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            return few_key_attention(q, k, v, backend=backend) * 2.0

    eager = forward_and_grads(fn, q, k, v, dout)
    torch._dynamo.reset()
    compiled = forward_and_grads(torch.compile(fn, fullgraph=True), q, k, v, dout)
    for name, c, e in zip(("out", "dq", "dk", "dv"), compiled, eager):
        assert torch.equal(c, e), f"{name}: compiled differs from eager"
