"""Every Triton kernel of the package compiles for sm_90 on this CPU machine, as real launches
would build it (resnet_fused/triton/aot.py records the launchers' own calls and specializes them
with Triton's launch-time binder).

Compiled: the forward conv for every (kernel size, dtype, config) the GPU selector can return,
fp64 included, in a train and an eval variant with the divisibility marks of real ResNet shapes
and a ``ragged`` variant (M = 49; ResNeXt's grouped 3x3, cin_pg = 4) without them; dgrad and
wgrad for every GPU backward config and dtype, 1x1 and 3x3, train and ragged; the statistics,
finalize, BN-apply and BN-backward kernels in every dtype. 16-bit GEMMs must use wgmma, every
kernel must fit the 227 KB of shared memory of an sm_90 block, and registers and spills are read
from the cubin (cuobjdump -res-usage) and ptxas -v, on triton 3.6 as on 3.8: a spill that is not
listed in KNOWN_SPILLS below, with its size, fails.

The compile runs in a subprocess without TRITON_INTERPRET (interpreted kernels cannot be compiled,
and conftest sets it for this process), in a process pool over the usable cores
(RESNET_FUSED_AOT_JOBS to change it); Triton's on-disk cache makes a rerun cheap.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from resnet_fused.triton.configs import (BACKWARD_GPU_CONFIGS, FP64_BACKWARD_CONFIG, SHARED_MEMORY_LIMITS,
                                         BackwardConfig, all_conv_configs, shared_memory_bytes)

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

#: Stack bytes per thread (where spills live) of every compiled variant that has any, by Triton
#: version and (kernel, variant, dtype, kernel size, tiles "MxNxK/warps/stages"), as measured on
#: the working tree of 2026-12-01 ~16:00 UTC (registers and ptxas's spill stores in the comments).
#: A new spill, or a known one that grew, fails test_spills_are_known; one that shrank or went
#: away is a warning (update the entry). The versions' ptxas runs differ (triton 3.8 adds
#: --regAllocOptLevel=2), so each has its own list; a version without one is held to the union.
#: What they say: the ragged 3x3 (ResNeXt's grouped conv, cin_pg = 4, under a 64-wide K tile)
#: spills kilobytes at the 16-bit tiles; the 16-bit 3x3 train variants and the backward GEMMs at
#: 128x64x64 sit at the 255-register cap; fp64's finalize (64x64 block of three fp64 partials
#: through tl.reduce) spills a little.
KNOWN_SPILLS: dict[str, dict[tuple, int]] = {
    "3.8": {
        ("_bn_finalize_kernel", "divisible", "fp64", None, None): 80,  # 255 registers, 152 B spill stores
        ("_bn_relu_conv_kernel", "ragged", "bf16", 3, "128x128x64/8/3"): 904,  # 255 registers, 1352 B
        ("_bn_relu_conv_kernel", "ragged", "bf16", 3, "128x64x64/4/3"): 2896,  # 255 registers, 7568 B
        ("_bn_relu_conv_kernel", "ragged", "bf16", 3, "64x64x32/4/2"): 8,  # 255 registers, 4 B
        ("_bn_relu_conv_kernel", "ragged", "fp32", 3, "64x64x32/4/3"): 200,  # 255 registers, 264 B
        ("_bn_relu_conv_kernel", "train", "bf16", 3, "128x64x64/4/3"): 32,  # 255 registers, 32 B
        ("_bn_relu_conv_kernel", "train", "fp16", 3, "128x64x64/4/3"): 56,  # 255 registers, 52 B
        ("_conv_dgrad_kernel", "ragged", "bf16", 3, "128x64x64/4/3"): 2472,  # 255 registers, 8616 B
        ("_conv_dgrad_kernel", "ragged", "fp32", 3, "64x64x32/4/2"): 280,  # 255 registers, 304 B
        ("_conv_dgrad_kernel", "train", "bf16", 1, "128x64x64/4/3"): 24,  # 255 registers, 24 B
        ("_conv_dgrad_kernel", "train", "bf16", 3, "128x64x64/4/3"): 192,  # 255 registers, 188 B
        ("_conv_dgrad_kernel", "train", "fp16", 1, "128x64x64/4/3"): 24,  # 255 registers, 20 B
        ("_conv_dgrad_kernel", "train", "fp16", 3, "128x64x64/4/3"): 120,  # 255 registers, 116 B
        ("_conv_wgrad_kernel", "ragged", "bf16", 3, "128x64x64/4/3"): 1312,  # 255 registers, 1692 B
        ("_conv_wgrad_kernel", "ragged", "fp32", 3, "64x64x32/4/2"): 64,  # 255 registers, 68 B
        ("_conv_wgrad_kernel", "train", "fp16", 3, "128x64x64/4/3"): 48,  # 255 registers, 44 B
    },
    "3.6": {
        ("_bn_finalize_kernel", "divisible", "fp64", None, None): 24,  # 255 registers, 48 B spill stores
        ("_bn_relu_conv_kernel", "ragged", "bf16", 3, "128x128x64/8/3"): 1328,  # 255 registers, 1816 B
        ("_bn_relu_conv_kernel", "ragged", "bf16", 3, "128x64x64/4/3"): 2224,  # 255 registers, 8608 B
        ("_bn_relu_conv_kernel", "ragged", "fp32", 3, "64x64x32/4/3"): 152,  # 255 registers, 152 B
        ("_conv_dgrad_kernel", "ragged", "bf16", 3, "128x64x64/4/3"): 2520,  # 255 registers, 9424 B
        ("_conv_dgrad_kernel", "ragged", "fp32", 3, "64x64x32/4/2"): 440,  # 255 registers, 488 B
        ("_conv_dgrad_kernel", "train", "bf16", 1, "128x64x64/4/3"): 32,  # 255 registers, 28 B
        ("_conv_dgrad_kernel", "train", "bf16", 3, "128x64x64/4/3"): 256,  # 255 registers, 252 B
        ("_conv_dgrad_kernel", "train", "fp16", 1, "128x64x64/4/3"): 32,  # 255 registers, 28 B
        ("_conv_dgrad_kernel", "train", "fp16", 3, "128x64x64/4/3"): 256,  # 255 registers, 252 B
        ("_conv_wgrad_kernel", "ragged", "bf16", 3, "128x64x64/4/3"): 1376,  # 255 registers, 1392 B
        ("_conv_wgrad_kernel", "ragged", "fp32", 3, "64x64x32/4/2"): 48,  # 255 registers, 56 B
    },
}
#: fp64's GEMMs may keep a few spilled registers (listed above), never the multiply-reduce's
#: product tile in local memory (21,344 bytes per thread at the old 64x64x32 tiles).
FP64_STACK_LIMIT = 128

CONV = "_bn_relu_conv_kernel"


def _tiles(cfg: dict) -> str:
    return f"{cfg['block_m']}x{cfg['block_n']}x{cfg['block_k']}/{cfg['num_warps']}/{cfg['num_stages']}"


def _key(r: dict) -> tuple:
    return (r["kernel"], r["variant"], r["dtype"], r.get("ksize"), _tiles(r["config"]) if r.get("config") else None)


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "resnet_fused.triton.aot"], env=env,
                          capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def records(compiled):
    return compiled["records"]


def test_no_kernel_fails_to_compile(records):
    failed = [(_key(r), r["error"][:300]) for r in records if "error" in r]
    assert not failed, failed


def test_every_kernel_of_the_package_compiles(compiled):
    """Every launchable ``*_kernel`` of the package's kernel modules, elementwise ones included."""
    names = {r["kernel"] for r in compiled["records"]}
    assert set(compiled["entry_kernels"]) == names
    assert {CONV, "_conv_dgrad_kernel", "_conv_wgrad_kernel", "_channel_stats_partial_kernel",
            "_bn_finalize_kernel", "_bn_relu_apply_kernel", "_relu_grad_sums_kernel",
            "_bn_backward_coefficients_kernel", "_bn_backward_apply_kernel"} <= names


def test_every_selector_config_compiles(records):
    """train and eval of every (ksize, dtype, config) the selector can return, fp64 included; the
    ragged variant for bf16, fp32 and fp64 (fp16's differs from bf16's only in conversions)."""
    got = {(r["variant"], r["ksize"], r["dtype"], _tiles(r["config"])) for r in records if r["kernel"] == CONV}
    for ksize, dtype, c in all_conv_configs():
        tiles = _tiles(c.__dict__)
        variants = ("train", "eval") + (("ragged",) if dtype != torch.float16 else ())
        for variant in variants:
            assert (variant, ksize, DTYPE_NAMES[dtype], tiles) in got, (variant, ksize, dtype, c)
    assert any(r["dtype"] == "fp64" for r in records if r["kernel"] == CONV)


def test_backward_gemms_compile(records):
    """dgrad and wgrad, 1x1 and 3x3, for every GPU backward config and dtype (fp64's 16^3 tiles
    included), train and ragged."""
    want = {(DTYPE_NAMES[d], _tiles(cfg.__dict__)) for sixteen, cfg in BACKWARD_GPU_CONFIGS.items()
            for d in ((torch.bfloat16, torch.float16) if sixteen else (torch.float32,))}
    want.add(("fp64", _tiles(FP64_BACKWARD_CONFIG.__dict__)))
    for name in ("_conv_dgrad_kernel", "_conv_wgrad_kernel"):
        got = {(r["dtype"], _tiles(r["config"]), r["ksize"], r["variant"]) for r in records if r["kernel"] == name}
        for dtype, tiles in want:
            for ksize in (1, 3):
                assert (dtype, tiles, ksize, "train") in got, (name, dtype, ksize)
                if dtype != "fp16":
                    assert (dtype, tiles, ksize, "ragged") in got, (name, dtype, ksize)


def test_ragged_variants_lack_the_divisibility_marks(records):
    """The ragged launches really are other kernels: M (and for the grouped 3x3, cin_pg) not
    marked divisible by 16, where the train variant has them marked."""
    for r in records:
        if r["kernel"] in (CONV, "_conv_dgrad_kernel", "_conv_wgrad_kernel"):
            if r["variant"] == "ragged":
                assert "M" not in r["divisible"], r
                if r["ksize"] == 3:
                    assert "cin_pg" not in r["divisible"] and "cout_pg" not in r["divisible"], r
            else:
                assert {"M", "cin_pg", "cout_pg"} <= set(r["divisible"]), r
        elif r["variant"] == "ragged" and "M" in r["divisible"]:
            pytest.fail(f"ragged launch with M marked divisible: {r}")


def test_16bit_gemms_use_wgmma(records):
    for r in records:
        if r["kernel"] in (CONV, "_conv_dgrad_kernel", "_conv_wgrad_kernel") and r["dtype"] in ("bf16", "fp16"):
            assert r["wgmma"], _key(r)


def test_shared_memory_within_sm90_budget(records):
    for r in records:
        assert 0 <= r["shared"] <= SHARED_MEMORY_LIMITS[(9, 0)], _key(r)


def test_shared_memory_estimate_covers_the_compiled_kernels(records):
    """The selector's estimate (configs.shared_memory_bytes, what it filters configs by) is at
    least what Triton actually allocated, for every compiled GEMM of a config: the forward under
    the forward factor, the dgrad and wgrad under the backward one."""
    sizes = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}
    gemms = {CONV: False, "_conv_dgrad_kernel": True, "_conv_wgrad_kernel": True}
    checked = 0
    for r in records:
        if r["kernel"] in gemms and r.get("config"):
            estimate = shared_memory_bytes(BackwardConfig(**r["config"]), sizes[r["dtype"]],
                                           backward=gemms[r["kernel"]])
            assert r["shared"] <= estimate, (_key(r), r["shared"], estimate)
            checked += 1
    assert checked > 0


def test_registers_and_spills_were_read(records):
    """From the tools, not Triton's records (None under triton 3.6 without a device)."""
    for r in records:
        for field in ("registers", "stack", "spill_stores", "spill_loads"):
            assert isinstance(r[field], int), (field, _key(r), r)
        assert 0 < r["registers"] <= 255, _key(r)


def _known_spills(version: str) -> dict[tuple, int]:
    if version in KNOWN_SPILLS:
        return KNOWN_SPILLS[version]
    union: dict[tuple, int] = {}  # no list of its own: nothing beyond what some version spills
    for listed in KNOWN_SPILLS.values():
        for k, v in listed.items():
            union[k] = max(v, union.get(k, 0))
    return union


def test_spills_are_known(compiled):
    """No stack (spills or local arrays) anywhere but in KNOWN_SPILLS, none larger than listed."""
    found = {_key(r): r["stack"] for r in compiled["records"] if r["stack"] or r["spill_stores"]}
    known = _known_spills(".".join(compiled["triton"].split(".")[:2]))
    new = {k: (v, known.get(k)) for k, v in found.items() if v > known.get(k, 0)}
    assert not new, f"new or grown stack (bytes, listed) under triton {compiled['triton']}: {new}"
    smaller = {k: (found.get(k, 0), v) for k, v in known.items() if found.get(k, 0) < v}
    if smaller:
        warnings.warn(f"KNOWN_SPILLS lists more than was found (found, listed), update it: {smaller}")


def test_fp64_variants_do_not_spill(records):
    """fp64's broadcast multiply-reduce at the 16^3 tiles stays in registers: no stack but the
    listed exceptions, and never more than FP64_STACK_LIMIT bytes."""
    fp64 = [r for r in records if r["dtype"] == "fp64"]
    assert {r["kernel"] for r in fp64} >= {CONV, "_conv_dgrad_kernel", "_conv_wgrad_kernel"}
    for r in fp64:
        if r["kernel"] in (CONV, "_conv_dgrad_kernel", "_conv_wgrad_kernel") and r["variant"] != "ragged":
            assert r["stack"] == 0 and r["spill_stores"] == 0, (_key(r), r["stack"], r["spill_stores"])
        assert r["stack"] <= FP64_STACK_LIMIT, (_key(r), r["stack"])
