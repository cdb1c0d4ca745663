"""Test configuration, run before anything imports torch or triton.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET is read when
``@triton.jit`` decorates a function, so it must be set before any project module is imported.
The GPU is detected from the device nodes, without importing torch (importing torch here
would be too early for nothing, but querying CUDA at collection time is what STYLE.md warns
against).
"""
import glob
import os

if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator: fresh random inputs per test, reproducible across runs."""
    return torch.Generator().manual_seed(1234)
