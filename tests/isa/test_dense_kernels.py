"""The exact group's kernel choice: setting, environment variable, logged fallbacks, recorded choices.

CPU checks of the selection logic; measuring and running the CUDA kernels is in test_isa_gpu.py.
"""

import logging

import pytest
import torch
import torch.nn.functional as F

from liveditor.isa.dense_kernels import (
    DENSE_KERNEL_ENV,
    choose_dense_kernel,
    dense_exact_attention,
    dense_kernel_choices,
    dense_kernel_setting,
    set_dense_kernel,
)

LOGGER = "liveditor.isa.dense_kernels"


pytestmark = pytest.mark.usefixtures("fresh_dense_kernel_state")


def cpu_qkv(seed: int, N: int = 48, D: int = 16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, N, D, generator=g) for _ in range(3)]


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_setting_order_call_then_process_then_environment(monkeypatch):
    assert dense_kernel_setting() == "auto"
    monkeypatch.setenv(DENSE_KERNEL_ENV, " Flash ")
    assert dense_kernel_setting() == "flash"
    set_dense_kernel("triton")
    assert dense_kernel_setting() == "triton"
    q, _, _ = cpu_qkv(0)
    assert choose_dense_kernel(q, masked=False, setting="sdpa") == "sdpa"  # a call's own setting wins
    set_dense_kernel(None)
    assert dense_kernel_setting() == "flash"
    monkeypatch.setenv(DENSE_KERNEL_ENV, "")
    assert dense_kernel_setting() == "auto"


def test_bad_values_are_one_line_errors_naming_their_source(monkeypatch):
    monkeypatch.setenv(DENSE_KERNEL_ENV, "fa9")
    with pytest.raises(ValueError, match=DENSE_KERNEL_ENV) as env_error:
        dense_kernel_setting()
    with pytest.raises(ValueError, match="dense kernel must be one of") as call_error:
        set_dense_kernel("cuda-magic")
    for error in (env_error, call_error):
        assert "\n" not in str(error.value) and "auto" in str(error.value)


@pytest.mark.parametrize("seed", [0])
def test_auto_takes_triton_for_padded_keys_and_sdpa_off_cuda(caplog, seed):
    q, _, _ = cpu_qkv(seed)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert choose_dense_kernel(q, masked=True) == "triton"
        assert choose_dense_kernel(q, masked=False) == "sdpa"
    assert warnings_of(caplog) == []
    assert dense_kernel_choices() == {("cpu", torch.float32, 16, False, "auto"): "sdpa"}


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("pinned", ["fa3", "flash"])
def test_pinned_kernel_without_mask_support_gives_padded_keys_to_triton(caplog, pinned, seed):
    q, _, _ = cpu_qkv(seed)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert choose_dense_kernel(q, masked=True, setting=pinned) == "triton"
        assert choose_dense_kernel(q, masked=True, setting=pinned) == "triton"
    warned = warnings_of(caplog)
    assert len(warned) == 1 and pinned in warned[0] and "Triton kernel" in warned[0]  # once per case
    assert dense_kernel_choices() == {("cpu", torch.float32, 16, True, pinned): "triton"}


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("pinned", ["cudnn", "efficient", "flash", "fa3"])
def test_pinned_cuda_kernel_on_cpu_inputs_falls_back_to_sdpa_with_a_warning(caplog, monkeypatch, pinned, seed):
    monkeypatch.setenv(DENSE_KERNEL_ENV, pinned)
    q, _, _ = cpu_qkv(seed)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert choose_dense_kernel(q, masked=False) == "sdpa"
    warned = warnings_of(caplog)
    assert len(warned) == 1 and repr(pinned) in warned[0] and "cpu" in warned[0]
    assert dense_kernel_choices()[("cpu", torch.float32, 16, False, pinned)] == "sdpa"


@pytest.mark.parametrize("seed", [0, 1])
def test_a_kernel_that_refuses_falls_back_to_sdpa_with_a_warning(caplog, seed):
    """SDPA's cuDNN backend refuses CPU tensors: the exact group still comes out, from SDPA, and says so."""
    q, k, v = cpu_qkv(seed)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = dense_exact_attention("cudnn", q, k, v, None, 0.25)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.25), rtol=0, atol=0)
    warned = warnings_of(caplog)
    assert len(warned) == 1 and "'cudnn' refused" in warned[0] and "\n" not in warned[0]


@pytest.mark.parametrize("seed", [0])
def test_the_environment_variable_pins_the_operator(monkeypatch, seed):
    """LIVEDITOR_ISA_DENSE_KERNEL=triton makes the operator run the exact group in the Triton kernel."""
    pytest.importorskip("triton")
    from liveditor.isa import ISAConfig, ops

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(1, 1, 48, 32, generator=g, device=device).to(torch.bfloat16) for _ in range(3))
    config = ISAConfig(block_size=16, select_ratio=0.5)
    monkeypatch.setenv(DENSE_KERNEL_ENV, "triton")
    pinned = ops.isa_attention_triton(q, k, v, 32, config, scale=0.2)
    assert dense_kernel_choices() == {}  # "triton" needs no choice
    explicit = ops.isa_attention_triton(q, k, v, 32, config, scale=0.2, dense_kernel="triton")
    assert torch.equal(pinned, explicit)
    monkeypatch.delenv(DENSE_KERNEL_ENV)
    ops.isa_attention_triton(q, k, v, 32, config, scale=0.2)  # whole context blocks: auto -> a dense kernel
    assert list(dense_kernel_choices()) == [(str(q.device), torch.bfloat16, 32, False, "auto")]
    if device == "cpu":
        assert dense_kernel_choices()[("cpu", torch.bfloat16, 32, False, "auto")] == "sdpa"
