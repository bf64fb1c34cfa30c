import pytest

from liveditor.isa import dense_kernels
from liveditor.isa.dense_kernels import DENSE_KERNEL_ENV


@pytest.fixture
def fresh_dense_kernel_state(monkeypatch):
    """As in a fresh process: no dense-kernel setting, no environment variable, nothing chosen or
    warned yet."""
    monkeypatch.delenv(DENSE_KERNEL_ENV, raising=False)
    monkeypatch.setattr(dense_kernels, "_setting", None)
    monkeypatch.setattr(dense_kernels, "_choices", {})
    monkeypatch.setattr(dense_kernels, "_warned", set())
