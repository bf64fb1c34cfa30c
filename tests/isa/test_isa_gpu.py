"""ISA on a CUDA GPU: what CPU CI cannot run.

Under TRITON_INTERPRET every tl.dot is upcast to fp32, SDPA's CUDA kernels do not exist and CUDA
graphs cannot be captured; here the kernels' bf16/fp16 tensor-core branch, the dense kernels of the
exact group and graph capture run for real. Accuracy by the FlashAttention rule: the Triton path's
error against an fp32 computation of ISA is at most twice the PyTorch path's error in the same
precision, plus one rounding of the output dtype; forward and backward. Fixed seeds throughout.

    pytest -m cuda tests/isa          # on a machine with a CUDA GPU (skipped elsewhere)
"""

import logging

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import forward_and_grads, max_err

from liveditor.isa import ISAConfig, isa_attention
from liveditor.isa.reference import isa_attention_torch

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("fresh_dense_kernel_state")]
triton = pytest.importorskip("triton")
from liveditor.isa import ops  # noqa: E402
from liveditor.isa.dense_kernels import (  # noqa: E402
    DENSE_KERNEL_ENV,
    available_dense_kernels,
    choose_dense_kernel,
    dense_kernel_choices,
    run_dense_kernel,
)

LOGGER = "liveditor.isa.dense_kernels"
ABS_FLOOR = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 1e-5}




def draw(B, H, N, D, dtype, seed, scale=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [(scale * torch.randn(B, H, N, D, device="cuda", generator=g)).to(dtype) for _ in range(3)]


def assert_flash_rule(kernel, low_precision, reference, dtype, what):
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), kernel, low_precision, reference):
        assert a.dtype == dtype, f"{what} {name}: dtype {a.dtype}"
        assert torch.isfinite(a).all(), f"{what} {name}: non-finite values"
        kernel_err, torch_err = max_err(a, r), max_err(b, r)
        bound = 2 * torch_err + ABS_FLOOR[dtype] * max(1.0, r.abs().max().item())
        assert kernel_err <= bound, (
            f"{what} {name}: Triton-path error {kernel_err:.3g} over 2 x PyTorch-path error {torch_err:.3g} + floor"
        )


def check_against_pytorch_path(B, H, L_src, L_ctx, D, config, dtype, dense_kernel, seed, input_scale=1.0):
    q, k, v = draw(B, H, L_src + L_ctx, D, dtype, seed, input_scale)
    grad_out = draw(B, H, L_src + L_ctx, D, torch.float32, seed + 1000)[0]
    kw = dict(num_source=L_src, config=config, scale=D ** -0.5)
    kernel = forward_and_grads(ops.isa_attention_triton, q, k, v, grad_out, dense_kernel=dense_kernel, **kw)
    low = forward_and_grads(isa_attention_torch, q, k, v, grad_out, **kw)
    ref = forward_and_grads(isa_attention_torch, q.float(), k.float(), v.float(), grad_out, **kw)
    assert_flash_rule(kernel, low, ref, dtype, f"seed {seed}, {dtype}, dense_kernel={dense_kernel}")


# (B, H, L_src, L_ctx, D, block): the 14B model's head dim and block size with whole and partial
# context blocks, a short source, no context, head dim 64 and a small block.
SHAPES = [
    (1, 4, 2048, 2048, 128, 64),
    (1, 4, 2040, 1980, 128, 64),
    (2, 2, 700, 1300, 64, 64),
    (1, 3, 1024, 0, 128, 64),
    (2, 2, 520, 390, 64, 32),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,H,L_src,L_ctx,D,b", SHAPES)
@pytest.mark.parametrize("dense_kernel", ["triton", "auto", "sdpa"])
def test_tensor_core_kernels_forward_backward(B, H, L_src, L_ctx, D, b, dtype, dense_kernel, seed):
    config = ISAConfig(block_size=b, select_ratio=0.25, exact_ratio=0.125)
    check_against_pytorch_path(B, H, L_src, L_ctx, D, config, dtype, dense_kernel, seed)


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_release_config_with_gate(dtype, seed):
    """The release's settings (topk sharpness, floor rounding) with the gated residual, 64-token blocks."""
    B, H, L_src, L_ctx, D = 1, 4, 2040, 2040, 128
    config = ISAConfig(sharpness="topk", count_rounding="floor")
    q, k, v = draw(B, H, L_src + L_ctx, D, dtype, seed)
    gate = draw(B, 1, L_src + L_ctx, 1, torch.float32, seed + 1)[0].reshape(B, L_src + L_ctx)
    grad_out = draw(B, H, L_src + L_ctx, D, torch.float32, seed + 1000)[0]
    kw = dict(num_source=L_src, config=config, scale=D ** -0.5)
    kernel = forward_and_grads(lambda *a, **k_: ops.isa_attention_triton(*a, gate=gate, **k_), q, k, v, grad_out, **kw)
    low = forward_and_grads(lambda *a, **k_: isa_attention_torch(*a, gate=gate, **k_), q, k, v, grad_out, **kw)
    ref = forward_and_grads(lambda *a, **k_: isa_attention_torch(*a, gate=gate, **k_), q.float(), k.float(),
                            v.float(), grad_out, **kw)
    assert_flash_rule(kernel, low, ref, dtype, f"seed {seed}, {dtype}, release config")
    _, info_kernel = ops.isa_attention_triton(q, k, v, L_src, config, gate=gate, scale=D ** -0.5, return_info=True)
    _, info_torch = isa_attention_torch(q, k, v, L_src, config, gate=gate, scale=D ** -0.5, return_info=True)
    assert torch.equal(info_kernel.selected_context_blocks, info_torch.selected_context_blocks)
    assert torch.equal(info_kernel.exact_query_blocks, info_torch.exact_query_blocks)


@pytest.mark.parametrize("seed", [0, 1])
def test_fp16_large_logits_stay_finite_on_the_triton_path(seed):
    """|q.k| beyond fp16's range, scaled logits of order 10: finite, and as accurate as SDPA in fp16."""
    B, H, N, D, L_src = 1, 2, 1024, 64, 512
    q, k, v = draw(B, H, N, D, torch.float16, seed)
    q, k = q * 80, k * 80
    scale = 1e-4
    assert (q.float() @ k.float().transpose(-1, -2)).abs().max() > torch.finfo(torch.float16).max
    config = ISAConfig(block_size=64, select_ratio=1.0, full_ratio=1.0)  # nothing sparse: ISA = attention
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    sdpa16 = F.scaled_dot_product_attention(q, k, v, scale=scale)
    for dense_kernel in ("triton", "auto"):
        out = ops.isa_attention_triton(q, k, v, L_src, config, scale=scale, dense_kernel=dense_kernel)
        assert torch.isfinite(out).all(), f"seed {seed}, {dense_kernel}"
        err, sdpa_err = max_err(out, reference), max_err(sdpa16, reference)
        assert err <= 2 * sdpa_err + ABS_FLOOR[torch.float16], (
            f"seed {seed}, {dense_kernel}: error {err:.3g}, SDPA fp16 {sdpa_err:.3g}"
        )


@pytest.mark.parametrize("seed", [0])
def test_auto_measures_once_records_and_logs_the_dense_kernel(caplog, seed):
    q, _, _ = draw(1, 1, 64, 128, torch.bfloat16, seed)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        first = choose_dense_kernel(q, masked=False)
        second = choose_dense_kernel(q, masked=False)
    assert first == second
    present = available_dense_kernels(masked=False)
    assert first in present, f"auto chose {first!r} from {present}"  # on a Hopper card at least flash runs
    x = draw(1, 8, 1024, 128, torch.bfloat16, seed + 1)[0]
    assert torch.isfinite(run_dense_kernel(first, x, x, x)).all()
    measured = [r for r in caplog.records if r.name == LOGGER and "measured" in r.getMessage()]
    assert len(measured) == 1 and measured[0].levelno == logging.INFO
    assert dense_kernel_choices() == {(str(q.device), torch.bfloat16, 128, False, "auto"): first}
    assert choose_dense_kernel(q, masked=True) == "triton"  # padded keys: no key mask needed


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("pinned", ["flash", "efficient", "cudnn", "sdpa", "fa3"])
def test_pinned_dense_kernels_compute_the_same_exact_group(caplog, monkeypatch, pinned, seed):
    if pinned == "fa3" and "fa3" not in available_dense_kernels(masked=False):
        pytest.skip("FlashAttention-3 (flash_attn_interface) is not installed")
    B, H, L_src, L_ctx, D = 1, 4, 2048, 2048, 128
    config = ISAConfig(select_ratio=0.25, exact_ratio=0.125)
    q, k, v = draw(B, H, L_src + L_ctx, D, torch.bfloat16, seed)
    monkeypatch.setenv(DENSE_KERNEL_ENV, pinned)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = ops.isa_attention_triton(q, k, v, L_src, config, scale=D ** -0.5)
    warned = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    if pinned in ("flash", "efficient", "sdpa", "fa3"):  # these run bf16, head dim 128 on Hopper
        assert warned == []
        assert choose_dense_kernel(q, masked=False) == pinned
    else:  # cuDNN support depends on its version: it runs, or it refused and said so once
        assert len(warned) <= 1 and all("'cudnn' refused" in w for w in warned)
        assert choose_dense_kernel(q, masked=False) == ("sdpa" if warned else "cudnn")
    triton_out = ops.isa_attention_triton(q, k, v, L_src, config, scale=D ** -0.5, dense_kernel="triton")
    reference = isa_attention_torch(q.float(), k.float(), v.float(), L_src, config, scale=D ** -0.5)
    assert max_err(out, reference) <= 2 * max_err(triton_out, reference) + ABS_FLOOR[torch.bfloat16], pinned


@pytest.mark.parametrize("seed", [0])
def test_pinned_flash_with_padded_keys_uses_triton_and_warns(caplog, monkeypatch, seed):
    q, k, v = draw(1, 2, 1000, 64, torch.bfloat16, seed)  # 500 context tokens: the last block is partial
    monkeypatch.setenv(DENSE_KERNEL_ENV, "flash")
    config = ISAConfig()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = ops.isa_attention_triton(q, k, v, 500, config, scale=0.125)
    warned = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "'flash' takes no key mask" in warned[0]
    assert torch.equal(out, ops.isa_attention_triton(q, k, v, 500, config, scale=0.125, dense_kernel="triton"))


@pytest.mark.parametrize("seed", [0])
def test_a_pinned_kernel_that_refuses_falls_back_with_a_warning(caplog, monkeypatch, seed):
    """SDPA's flash backend takes no fp32: the pinned choice falls back to SDPA's own, and says so."""
    q, k, v = draw(1, 2, 1024, 64, torch.float32, seed)
    monkeypatch.setenv(DENSE_KERNEL_ENV, "flash")
    config = ISAConfig()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = ops.isa_attention_triton(q, k, v, 512, config, scale=0.125)
    warned = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "'flash' refused" in warned[0]
    assert dense_kernel_choices()[(str(q.device), torch.float32, 64, False, "flash")] == "sdpa"
    reference = isa_attention_torch(q.double(), k.double(), v.double(), 512, config, scale=0.125)
    assert max_err(out, reference) <= 1e-4 * max(1.0, reference.abs().max().item())


@pytest.mark.parametrize("seed", [0])
def test_auto_backend_runs_the_kernels_on_cuda(seed):
    q, k, v = draw(1, 2, 1024, 64, torch.bfloat16, seed)
    config = ISAConfig()
    auto = isa_attention(q, k, v, 512, config, backend="auto")
    assert torch.equal(auto, isa_attention(q, k, v, 512, config, backend="triton"))


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("dense_kernel", ["triton", "sdpa"])
def test_triton_path_on_a_second_gpu_while_the_current_device_is_0(monkeypatch, dense_kernel, seed):
    """Inputs on cuda:1 while the current device stays 0 (`--device cuda:1`): every Triton launch runs
    on the inputs' device and gives cuda:0's output and gradients; the current device is still 0."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    monkeypatch.setenv(DENSE_KERNEL_ENV, dense_kernel)  # "sdpa": the exact group is packed by Triton kernels
    B, H, L_src, L_ctx, D = 2, 4, 512, 500, 64
    kw = dict(num_source=L_src, config=ISAConfig(select_ratio=0.25, exact_ratio=0.125), backend="triton")
    with torch.cuda.device(0):
        q, k, v = draw(B, H, L_src + L_ctx, D, torch.bfloat16, seed)
        grad_out = draw(B, H, L_src + L_ctx, D, torch.float32, seed + 1000)[0]
        on_0 = forward_and_grads(isa_attention, q, k, v, grad_out, **kw)
        on_1 = forward_and_grads(isa_attention, *(x.to("cuda:1") for x in (q, k, v, grad_out)), **kw)
        assert torch.cuda.current_device() == 0
    for name, a, b in zip(("out", "dq", "dk", "dv"), on_1, on_0):
        assert a.device == torch.device("cuda:1"), f"{dense_kernel} {name}: on {a.device}"
        # Within one bf16 rounding at the tensor's scale, not bitwise: SDPA's backward may add with atomics.
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=2.0 ** -8 * b.abs().max().item(),
                                   msg=lambda m: f"{dense_kernel} {name}: {m}")


@pytest.mark.parametrize("seed", [0])
def test_training_under_autocast_routes_and_attends_as_inference_does(seed):
    # The training step runs the kernels under bf16 autocast; its routing must be inference's.
    q, k, v = draw(2, 8, 2048, 64, torch.bfloat16, seed)
    config = ISAConfig(block_size=16, select_ratio=0.5, full_ratio=0.4, exact_ratio=0.0625)
    out, info = isa_attention(q, k, v, 1024, config, backend="triton", return_info=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        autocast_out, autocast_info = isa_attention(q, k, v, 1024, config, backend="triton", return_info=True)
    assert torch.equal(autocast_info.exact_query_blocks, info.exact_query_blocks)
    assert torch.equal(autocast_info.selected_context_blocks, info.selected_context_blocks)
    assert torch.equal(autocast_out, out)


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("L_ctx", [192, 200], ids=["whole-blocks", "partial-block"])
def test_cuda_graph_capture_replays_on_new_inputs(L_ctx, seed):
    """No host sync in the hot path: the whole operator (routing included) captures and replays."""
    B, H, L_src, D, b = 1, 2, 256, 64, 32
    config = ISAConfig(block_size=b)
    q, k, v = draw(B, H, L_src + L_ctx, D, torch.bfloat16, seed)
    run = lambda: ops.isa_attention_triton(q, k, v, L_src, config, scale=D ** -0.5)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: kernel compilation and the dense-kernel choice
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for x, fresh in zip((q, k, v), draw(B, H, L_src + L_ctx, D, torch.bfloat16, seed + 1)):
        x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, run(), rtol=0, atol=1e-2)
