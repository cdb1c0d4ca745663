"""Post-activation blocks on the shared parity matrix (``block_cases.POSTACT_CASES``).

The fused drop-ins built from their constructors against torchvision's Bottleneck / BasicBlock
holding the same parameters, on both fused backends (Triton interpreted on the CPU, the CUDA C++
kernels' host emulation), through ``block_cases.check_postact_forward`` / ``check_postact_backward``
(the 2x-eager rule of tests/helpers.py on the output, the input gradient, every parameter
gradient and the running statistics; the launch counts of the fused path; the other backend
launching nothing). The same checks, with a fault injected, are the post-activation half of
tests/test_mutations.py.

Each case runs on both backends; the mode, dtype and layout alternate over (case, backend), so
every case sees train and eval (forward) or train and frozen (backward), and both layouts.
"""
from __future__ import annotations

import pytest
import torch

from block_cases import POSTACT_CASES, check_postact_backward, check_postact_forward
from helpers import requires_triton
from resnet_fused import _extension

requires_c = pytest.mark.skipif(not _extension.is_available(),
                                reason=f"resnet_fused._C is not available: {_extension.unavailable_reason()}")
BACKENDS = {"triton": requires_triton, "cuda": requires_c}
DTYPES = (torch.float32, torch.float16)
FLIP = {torch.channels_last: torch.contiguous_format, torch.contiguous_format: torch.channels_last}


def _matrix(modes):
    rows = []
    for i, case in enumerate(POSTACT_CASES):
        layout = POSTACT_CASES[case][4]
        for b, (backend, mark) in enumerate(BACKENDS.items()):
            rows.append(pytest.param(backend, case, modes[(i + b) % 2], DTYPES[(i // 2 + b) % 2],
                                     layout if b == 0 else FLIP[layout], marks=mark,
                                     id=f"{backend}-{case}-{modes[(i + b) % 2]}-"
                                        f"{'fp32' if (i // 2 + b) % 2 == 0 else 'fp16'}-"
                                        f"{'nhwc' if (layout if b == 0 else FLIP[layout]) == torch.channels_last else 'nchw'}"))
    return rows


@pytest.mark.parametrize("backend,case,mode,dtype,memory_format", _matrix(("train", "eval")))
def test_postact_forward(backend, case, mode, dtype, memory_format, gen):
    """Output and running statistics; eval without grad is the folded path (one conv per chain
    conv, no closing pass)."""
    check_postact_forward(case, backend, mode, dtype, gen, memory_format=memory_format)


@pytest.mark.parametrize("backend,case,mode,dtype,memory_format", _matrix(("train", "frozen")))
def test_postact_backward(backend, case, mode, dtype, memory_format, gen):
    """Output, input gradient, every parameter gradient and the running statistics of one step."""
    check_postact_backward(case, backend, mode, dtype, gen, memory_format=memory_format)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=m) for b, m in BACKENDS.items()])
def test_postact_batch1_eval(backend, gen):
    """Batch 1 in eval: the folded path (no batch statistics) on a 7x7 bottleneck."""
    check_postact_forward("postact-bottleneck-identity", backend, "eval", torch.float16, gen, shape=(1, 7, 7))
