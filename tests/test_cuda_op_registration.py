"""Registration of the C++ conv and elementwise ops: schemas, CPU and CUDA kernels, fakes,
opcheck, meta tensors.

Shared cases, references and fixtures, and how the host emulator runs the kernels on the CPU:
tests/cuda_kernel_helpers.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from cuda_kernel_helpers import (  # noqa: F401 (fixtures: kernels, ops)
    SCHEMAS,
    TILE_M,
    _opcheck_args,
    ops,
)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_op_registered_with_cpu_and_cuda_kernels(ops, name):
    op = getattr(ops, name)
    assert str(op.default._schema) == SCHEMAS[name]
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fused::{name}", key), key

@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_fake_impl_matches_real(ops, name, gen):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _opcheck_args(gen)[name]
    op = getattr(ops, name)
    real = op(*args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = op(*fake_args)
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype and r.stride() == f.stride(), (r.shape, f.shape,
                                                                                        r.stride(), f.stride())

@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_opcheck(ops, name, gen):
    args = _opcheck_args(gen)[name]
    # Every opcheck test, test_aot_dispatch_dynamic included (fake impls with symbolic shapes).
    torch.library.opcheck(getattr(ops, name), args)

def test_meta_tensors(ops):
    x = torch.empty(2, 5, 7, 7, device="meta")
    w = torch.empty(12, 5, 3, 3, device="meta")
    out, partials = ops.conv_fwd_cuda(x, w, None, None, 2, 1, None, 0, 1, None, None, None, True, None, None)
    # A 3x3's statistics partials: one per 8x8 block of output pixels of one image.
    assert out.shape == (2, 12, 4, 4) and partials.shape == (3, 2, 12)
    w1 = torch.empty(12, 5, 1, 1, device="meta")
    _, partials = ops.conv_fwd_cuda(x, w1, None, None, 1, 1, None, 0, 1, None, None, None, True, None, None)
    assert partials.shape == (3, math.ceil(2 * 7 * 7 / TILE_M), 12)
    assert out.is_contiguous(memory_format=torch.channels_last)
