"""benchmarks/host_overhead.py: one block and its table, and the --json file (one repeat)."""
from __future__ import annotations

import json

import pytest
import torch

import resnet_fused as rf
from benchmarks import host_overhead
from helpers import requires_triton
from resnet_fused import _extension
from resnet_fused.cuda import kernels as cuda_kernels
from resnet_fused.triton.launch import launch_counts, reset_launch_counts

requires_extension = pytest.mark.skipif(not _extension.is_available(),
                                        reason=f"resnet_fused._C: {_extension.unavailable_reason()}")


@requires_triton
def test_block_rows_and_table():
    reset_launch_counts()
    rows = host_overhead.measure((), ("FusedBottleneck(256, 256)",), repeats=1)
    assert launch_counts()["_bn_relu_conv_kernel"] > 0  # the fused block launched (kernels skipped)
    got = {(r["mode"], r["impl"], r["level"]) for r in rows}
    for mode in host_overhead.BLOCK_MODES:
        assert {(mode, "eager", "kernels run"), (mode, "triton", "triton"), (mode, "triton", "count")} <= got
    if _extension.is_available():
        assert all((mode, "cuda", "count") in got for mode in host_overhead.BLOCK_MODES)
    else:
        assert not any(impl == "cuda" for _, impl, _ in got)
    assert all(r["ms"] > 0 for r in rows)
    table = host_overhead.format_table(rows)
    assert "FusedBottleneck(256, 256)" in table and "skip:count" in table
    assert ("cuda skip:count" if _extension.is_available() else "cuda: not measured") in table


@requires_extension
@pytest.mark.parametrize("kind", ["pre", "post"])
def test_cuda_skip_kernels_calls_the_fakes(kind):
    """Under cuda.kernels.skip_kernels a CUDA-backend block calls no C++ op (the emulator's WMMA
    counters stay put), counts the launches it would make, and returns outputs of the real
    run's shapes, dtypes and layouts; outside it the ops run again."""
    torch.manual_seed(0)
    block = (rf.FusedBottleneck(40, 40, backend="cuda") if kind == "pre"
             else rf.FusedPostActBottleneck(40, 10, backend="cuda"))
    x = torch.randn(2, 40, 6, 6, dtype=torch.float16).to(memory_format=torch.channels_last)
    block = block.to(torch.float16)
    real = block(x)
    wmma = _extension.wmma_host_counts()
    cuda_kernels.reset_launch_counts()
    with cuda_kernels.skip_kernels():
        skipped = block(x)
        skipped.sum().backward()
    assert _extension.wmma_host_counts() == wmma  # no C++ conv ran
    counts = cuda_kernels.launch_counts()
    assert counts["conv_fwd_cuda"] >= 3 and counts["conv_dgrad_cuda"] >= 2 and counts["conv_wgrad_cuda"] >= 3
    assert (skipped.shape, skipped.dtype, skipped.stride()) == (real.shape, real.dtype, real.stride())
    block(x)
    assert _extension.wmma_host_counts()["mma_sync"] > wmma["mma_sync"]  # the ops run again


@requires_triton
def test_main_writes_json(tmp_path, capsys):
    path = tmp_path / "host.json"
    threads = torch.get_num_threads()
    try:
        argv = ["--model", "resnet_v2_50", "--no-blocks", "--repeats", "1", "--json", str(path)]
        assert host_overhead.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets 1 for the process
    data = json.loads(path.read_text())
    assert data["machine"]["threads"] == 1 and data["repeats"] == 1
    assert {r["mode"] for r in data["rows"]} == set(host_overhead.MODEL_MODES)
    assert "resnet_v2_50" in capsys.readouterr().out
