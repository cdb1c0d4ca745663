"""The benchmark harness runs (smoke test on the CPU) and the roofline reproduces docs/design.md's floors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_roofline_reproduces_design_floors():
    from benchmarks import roofline

    roofline.self_check()


def gpu_smoke_arguments(script: str) -> list[str]:
    """On a GPU, a smoke test, not a benchmark: small batches and sizes, and no whole-model
    torch.compile (a compiled ResNet-50 at batch 256 takes minutes). Nothing on a CPU, where
    the scripts' own defaults are already tiny."""
    import torch

    if not torch.cuda.is_available():
        return []
    if script == "bench_blocks.py":
        return ["--batch", "4", "--size", "small"]
    backends = [b for b in ("triton", "cuda") if b in __import__("resnet_fused").available_backends()]
    return ["--batch", "4", "--image-size", "64", "--impls", ",".join(["eager", *backends])]


def test_gpu_smoke_arguments_avoid_whole_model_compile(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    models = gpu_smoke_arguments("bench_models.py")
    impls = models[models.index("--impls") + 1].split(",")
    assert "eager" in impls and not any("compile" in i for i in impls)
    assert int(models[models.index("--batch") + 1]) <= 8
    blocks = gpu_smoke_arguments("bench_blocks.py")
    assert int(blocks[blocks.index("--batch") + 1]) <= 8 and "small" in blocks


@pytest.mark.parametrize("script", ["bench_blocks.py", "bench_models.py"])
def test_benchmark_quick_run_writes_json(script, tmp_path):
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    # One block family is enough to check the harness (the interpreted backward of all three
    # families costs minutes of CI).
    extra = ["--blocks", "bottleneck"] if script == "bench_blocks.py" else []
    extra += gpu_smoke_arguments(script)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *extra, "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first_line = proc.stdout.splitlines()[0]
    if "cuda" not in first_line.lower():
        assert "CPU-only" in first_line
    files = list(tmp_path.glob("*.json"))
    assert files, proc.stdout[-2000:]
    record = json.loads(files[0].read_text())
    assert record["rows"], "no rows measured"
