"""benchmarks/host_overhead.py: one block and its table, and the --json file (one repeat)."""
from __future__ import annotations

import json

import torch

from benchmarks import host_overhead
from helpers import requires_triton
from resnet_fused.triton.launch import launch_counts, reset_launch_counts


@requires_triton
def test_block_rows_and_table():
    reset_launch_counts()
    rows = host_overhead.measure((), ("FusedBottleneck(256, 256)",), repeats=1)
    assert launch_counts()["_bn_relu_conv_kernel"] > 0  # the fused block launched (kernels skipped)
    got = {(r["mode"], r["impl"], r["level"]) for r in rows}
    for mode in host_overhead.BLOCK_MODES:
        assert {(mode, "eager", "kernels run"), (mode, "triton", "triton"), (mode, "triton", "count")} <= got
    assert all(r["ms"] > 0 for r in rows)
    table = host_overhead.format_table(rows)
    assert "FusedBottleneck(256, 256)" in table and "skip:count" in table and "cuda: not measured" in table


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
