"""Test-wide setup.

Without a CUDA device, Triton kernels run on Triton's CPU interpreter: TRITON_INTERPRET must be set
before any kernel module is imported, hence here. Tests marked `cuda` need a CUDA GPU and are
skipped, with the reason, where there is none (run them with `pytest -m cuda` on a GPU machine).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end test of a minute or more on a CPU (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); run with `pytest -m cuda`")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked cuda)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
