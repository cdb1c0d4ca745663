"""Every config the selector can return compiles for sm_90 on this CPU machine.

16-bit GEMM configs must use wgmma (Hopper's warpgroup MMA), and every kernel must fit the
227 KB of shared memory of an sm_90 block. The compile runs in a subprocess without
TRITON_INTERPRET (interpreted kernels cannot be compiled, and conftest sets it for this process).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from resnet_fused.triton.configs import SHARED_MEMORY_LIMITS, all_conv_configs


@pytest.fixture(scope="module")
def records():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "resnet_fused.triton.aot"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_every_selector_config_compiles(records):
    convs = [r for r in records if r["kernel"] == "_bn_relu_conv_kernel"]
    assert len(convs) == 2 * len(all_conv_configs())  # train and eval variant of each


def test_16bit_configs_use_wgmma(records):
    for r in records:
        if r["kernel"] == "_bn_relu_conv_kernel" and r["dtype"] in ("bf16", "fp16"):
            assert r["wgmma"], r


def test_shared_memory_within_sm90_budget(records):
    for r in records:
        assert 0 <= r["shared"] <= SHARED_MEMORY_LIMITS[(9, 0)], r


def test_statistics_kernels_compile(records):
    names = {r["kernel"] for r in records}
    assert {"_channel_stats_partial_kernel", "_bn_finalize_kernel"} <= names


def test_backward_gemms_compile_with_wgmma(records):
    for name in ("_conv_dgrad_kernel", "_conv_wgrad_kernel"):
        found = [r for r in records if r["kernel"] == name]
        assert {(r["dtype"], r["ksize"]) for r in found} == {(d, k) for d in ("bf16", "fp16", "fp32") for k in (1, 3)}, name
        for r in found:
            if r["dtype"] in ("bf16", "fp16"):
                assert r["wgmma"], r
