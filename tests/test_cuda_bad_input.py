"""The C++ ops' input checks: bad calls raise a clear error; launchers without the extension
say how to build it.

Shared cases, references and fixtures, and how the host emulator runs the kernels on the CPU:
tests/cuda_kernel_helpers.py.
"""
from __future__ import annotations

import pytest

from cuda_kernel_helpers import (  # noqa: F401 (fixtures: kernels, ops)
    BAD_CALL_NAMES,
    _bad_calls,
    ops,
)


@pytest.mark.parametrize("name", BAD_CALL_NAMES)
def test_bad_input_raises_clear_error(ops, name, gen):
    call, match = _bad_calls(ops, gen)[name]
    with pytest.raises(RuntimeError, match=match):
        call()

def test_launchers_need_the_extension_message():
    # The launcher module imports without loading _C (the package must import without it).
    import subprocess
    import sys

    code = ("import sys, resnet_fused.cuda; "
            "assert 'resnet_fused._C' not in sys.modules, 'importing resnet_fused.cuda loaded _C'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
