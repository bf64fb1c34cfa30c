"""The backend choice: "auto" decides inputs off CUDA without importing the Triton kernels."""

from python_process import run_python

AUTO_ON_CPU = """
import sys
import torch
from liveditor.isa import ISAConfig, isa_attention
from liveditor.isa.dispatch import resolve_backend
from liveditor.isa.reference import isa_attention_torch

config = ISAConfig(block_size=16)
q, k, v = torch.randn(3, 1, 2, 40, 16, generator=torch.Generator().manual_seed(0))
assert resolve_backend("auto", q, config) is isa_attention_torch
assert torch.equal(isa_attention(q, k, v, 20, config), isa_attention(q, k, v, 20, config, backend="torch"))
print(" ".join(sorted(name for name in ("liveditor.isa.ops", "triton") if name in sys.modules)) or "none")
"""


def test_auto_on_cpu_runs_the_torch_path_without_importing_the_kernels():
    # A fresh interpreter: this one may have imported the kernels for other tests. It inherits the
    # conftest's TRITON_INTERPRET=1: auto leaves the interpreter to backend="triton" (tests).
    result = run_python("-c", AUTO_ON_CPU)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"  # imported: liveditor.isa.ops (and with it triton)
