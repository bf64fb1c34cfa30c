"""Test-wide setup: without a CUDA device, Triton kernels run on Triton's CPU interpreter.

TRITON_INTERPRET must be set before any kernel module is imported, hence here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end test of a minute or more on a CPU (deselect with -m 'not slow')")
