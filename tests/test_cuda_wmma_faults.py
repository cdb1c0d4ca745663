"""A faulty copy of the WMMA multiply phase must fail the 16-bit parity checks, and the host
WMMA shim refuses what the hardware forbids and counts every operation.

Shared cases, references and fixtures, and how the host emulator runs the kernels on the CPU:
tests/cuda_kernel_helpers.py.
"""
from __future__ import annotations

import pytest
import torch

from cuda_kernel_helpers import (  # noqa: F401 (fixtures: kernels, ops)
    FAULT_RUNS,
    FWD_CASES,
    HALO_CASES,
    WMMA_DTYPES,
    _check_forward,
    _data,
    _fault_case,
    _fwd_inputs,
    _ops_with_fwd_fault,
    _weight,
    kernels,
    ops,
)
from resnet_fused import _extension


@pytest.mark.parametrize("dtype", WMMA_DTYPES, ids=str)
@pytest.mark.parametrize("run", FAULT_RUNS, ids=lambda r: f"{r[0]}-{r[1]}")
def test_wrong_ldm_in_a_copy_of_the_wmma_phase_fails_parity(ops, kernels, run, dtype, gen, monkeypatch):
    # The A operand's ldm set to the tile's K width instead of its pitch (per-tap: 32 instead of 40
    # elements; halo: stride x 32 channels instead of stride x the 48-element pixel pitch): legal
    # for the hardware (a 16-byte multiple, aligned pointer), so the shim runs it, and the warp
    # reads the wrong rows, which include the pitch padding that nothing writes (NaN-filled in the
    # emulator). The unchanged parity check must fail; the control (the real op through the same
    # wrapper, same inputs) must pass.
    name, algo = run
    case = _fault_case(name)
    launch = {} if algo == "auto" else {"conv3x3_algo": algo}
    monkeypatch.setattr(kernels, "_ops", lambda: _ops_with_fwd_fault(ops, None))
    _check_forward(kernels, case, dtype, torch.Generator().manual_seed(7), **launch)
    monkeypatch.setattr(kernels, "_ops", lambda: _ops_with_fwd_fault(ops, "lda_is_width"))
    with pytest.raises(AssertionError, match="relative error"):
        _check_forward(kernels, case, dtype, torch.Generator().manual_seed(7), **launch)

@pytest.mark.parametrize("fault, message", [
    ("ldm_not_16_bytes", r"ldm = (36|44) elements \((72|88) bytes\) is not a positive multiple of 16 bytes"),
    ("pointer_not_32_bytes", r"the pointer is 16 bytes past a 32-byte boundary"),
    ("lane_divergent", r"warp-collective .* lane 1 of warp 0"),
])
@pytest.mark.parametrize("algo", ["per_tap", "halo"])
def test_wmma_shim_refuses_what_the_hardware_forbids(ops, fault, message, algo, gen):
    # A copy of the WMMA phase with an ldm that is not a 16-byte multiple, a pointer that is not
    # 32-byte aligned, or one lane of each warp passing a different (legal) pointer: the shim
    # raises a clear error naming the call, the value and the emulated thread.
    case = next(c for c in HALO_CASES if c.name == "s1_7x7_c3_to_12")
    x, w, kw = _fwd_inputs(case, torch.float16, gen)
    args = (x, w, kw["scale"], kw["shift"], case.stride, case.groups, None, 0, 1, None, None, None, True, None, None,
            {"per_tap": 1, "halo": 2}[algo])
    with pytest.raises(RuntimeError, match=message):
        ops._test_fault_wmma_conv_fwd_cuda(*args, _extension.WMMA_TEST_FAULTS[fault])
    ops.conv_fwd_cuda(*args)  # the shipped phase with the same arguments runs

def test_fault_op_is_test_only(ops, gen):
    # CPU kernel only, 16-bit only, faults 1..4 only; it is not one of the package's ops.
    qualname = "resnet_fused::_test_fault_wmma_conv_fwd_cuda"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA")
    assert "_test_fault_wmma_conv_fwd_cuda" not in _extension.CPP_OPS
    x = _data(gen, (1, 8, 4, 4), torch.float32)
    w = _weight(gen, (8, 8, 1, 1), torch.float32)
    args = (None, None, 1, 1, None, 0, 1, None, None, None, False, None, None, 0)
    with pytest.raises(RuntimeError, match="float16 and bfloat16 only"):
        ops._test_fault_wmma_conv_fwd_cuda(x, w, *args, 1)
    with pytest.raises(RuntimeError, match="fault must be 1..4"):
        ops._test_fault_wmma_conv_fwd_cuda(x.half(), w.half(), *args, 0)

def test_wmma_shim_counts_every_operation(kernels, gen):
    # One 1x1 forward of 2 x 64 tiles with 2 K steps: 4 blocks x 8 warps; per warp and K step of 32,
    # 2 A + 4 B loads and 4 mma_sync; per warp 2 fills and 2 stores. fp32 touches none of them.
    case = next(c for c in FWD_CASES if c.name == "1x1_identity_add")
    x, w, kw = _fwd_inputs(case, torch.float16, gen)
    x = torch.cat([x, x])  # M = 4 x 49 = 196 rows: 4 M tiles, one N tile (12 channels), K = 20: 1 step
    kw["shortcut"] = torch.cat([kw["shortcut"], kw["shortcut"]])
    before = _extension.wmma_host_counts()
    kernels.bn_relu_conv(x, w, **kw)
    after = _extension.wmma_host_counts()
    delta = {k: after[k] - before[k] for k in after}
    warps = 4 * 8
    assert delta == {"mma_sync": warps * 4, "load_matrix_sync": warps * 6, "store_matrix_sync": warps * 2,
                     "fill_fragment": warps * 2}
    before = _extension.wmma_host_counts()
    kernels.bn_relu_conv(x.float(), w.float(), **{k: (v.float() if k == "shortcut" else v) for k, v in kw.items()})
    assert _extension.wmma_host_counts() == before
