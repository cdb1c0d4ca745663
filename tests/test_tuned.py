"""The tuned launch tables (resnet_fused/tuned/) and their hook in the Triton selector, and the
generated data files (AUTO_CUDA_TABLE, the README's Results section).

No GPU is needed: the device's name and shared memory are stubbed, and the selector is asked
for a "cuda" device; nothing is launched.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from resnet_fused import tuned
from resnet_fused.triton import configs
from resnet_fused.triton.configs import BackwardConfig, ConvConfig

ROOT = Path(__file__).resolve().parent.parent
GPU = torch.device("cuda", 0)
NAME = "Fake GPU 9000"
TUNED_CONV = ConvConfig(64, 128, 64, 4, 4)
TUNED_DGRAD = BackwardConfig(64, 64, 64, 4, 3)
TUNED_WGRAD = BackwardConfig(128, 128, 64, 8, 3)
TUNED_BACKWARD = BackwardConfig(64, 128, 32, 4, 3)


def table(device_name: str = NAME) -> dict:
    shape = dict(ksize=1, m=200704, n=64, k=256)
    return {
        "schema": tuned.SCHEMA, "device_name": device_name, "device_slug": tuned.device_slug(device_name),
        "complete": True, "entries": [
            {"direction": "forward", "dtype": "bfloat16", **shape, "config": asdict(TUNED_CONV)},
            {"direction": "dgrad", "dtype": "bfloat16", **shape, "config": asdict(TUNED_DGRAD)},
            {"direction": "wgrad", "dtype": "bfloat16", **shape, "config": asdict(TUNED_WGRAD)},
            {"direction": "backward", "dtype": "bfloat16", "config": asdict(TUNED_BACKWARD)},
            {"direction": "strategy3x3", "dtype": "bfloat16", "m": 50176, "n": 128, "k": 1152, "strategy": "fused"},
        ],
    }


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    """A tuned table for NAME in a temporary folder; the selector sees a GPU of that name with
    sm_90's shared memory."""
    (tmp_path / "Fake-GPU-9000.json").write_text(json.dumps(table()))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other-schema.json").write_text(json.dumps({**table("Old GPU"), "schema": 99}))
    monkeypatch.setenv("RESNET_FUSED_TUNED_DIR", str(tmp_path))
    monkeypatch.delenv("RESNET_FUSED_TUNED", raising=False)
    monkeypatch.delenv(configs.STRATEGY_ENV, raising=False)
    monkeypatch.setattr(tuned, "_device_name", lambda index: NAME)
    monkeypatch.setattr(configs, "_shared_memory_limit", lambda device: configs.SHARED_MEMORY_LIMITS[(9, 0)])
    tuned.reload()
    yield tmp_path
    tuned.reload()


def heuristic_conv(m, n, k, ksize, dtype):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESNET_FUSED_TUNED", "0")
        return configs.conv_config(m, n, k, ksize, dtype, GPU)


def test_table_wins_for_its_device_dtype_and_shape(fake_gpu):
    assert configs.conv_config(200704, 64, 256, 1, torch.bfloat16, GPU) == TUNED_CONV
    assert heuristic_conv(200704, 64, 256, 1, torch.bfloat16) != TUNED_CONV  # the test means something
    # the nearest m within a factor of 4 (another batch size)
    assert configs.conv_config(200704 // 2, 64, 256, 1, torch.bfloat16, GPU) == TUNED_CONV
    assert configs.conv_config(200704 * 3, 64, 256, 1, torch.bfloat16, GPU) == TUNED_CONV


@pytest.mark.parametrize("m,n,k,ksize,dtype", [
    (200704 // 8, 64, 256, 1, torch.bfloat16),   # m too far
    (200704, 128, 256, 1, torch.bfloat16),       # another n
    (200704, 64, 512, 1, torch.bfloat16),        # another k
    (200704, 64, 256, 3, torch.bfloat16),        # another kernel size
    (200704, 64, 256, 1, torch.float16),         # another dtype
])
def test_heuristics_where_the_table_has_no_entry(fake_gpu, m, n, k, ksize, dtype):
    assert configs.conv_config(m, n, k, ksize, dtype, GPU) == heuristic_conv(m, n, k, ksize, dtype)


def test_other_device_and_switch_off_use_heuristics(fake_gpu, monkeypatch):
    expected = heuristic_conv(200704, 64, 256, 1, torch.bfloat16)
    monkeypatch.setattr(tuned, "_device_name", lambda index: "Another GPU")
    assert configs.conv_config(200704, 64, 256, 1, torch.bfloat16, GPU) == expected
    monkeypatch.setattr(tuned, "_device_name", lambda index: NAME)
    monkeypatch.setenv("RESNET_FUSED_TUNED", "0")
    assert configs.conv_config(200704, 64, 256, 1, torch.bfloat16, GPU) == expected
    # the CPU (interpreter) never reads a table
    monkeypatch.delenv("RESNET_FUSED_TUNED")
    assert configs.conv_config(200704, 64, 256, 1, torch.bfloat16, torch.device("cpu")) == configs._INTERPRETER_CONFIG


def test_forced_configs_win_over_the_table(fake_gpu):
    small = ConvConfig(16, 16, 16, 4, 1)
    small_bw = BackwardConfig(16, 16, 16, 4, 1)
    with configs.forced_configs(conv=small, backward=small_bw, strategy="hybrid"):
        assert configs.conv_config(200704, 64, 256, 1, torch.bfloat16, GPU) == small
        assert configs.backward_config(torch.bfloat16, GPU, direction="dgrad", ksize=1, m=200704, n=64, k=256) == small_bw
        assert configs.backward_config(torch.bfloat16, GPU) == small_bw
        assert configs.conv3x3_strategy(50176, 128, 1152, torch.bfloat16, GPU) == "hybrid"


def test_backward_config_by_direction_and_default(fake_gpu):
    shape = dict(ksize=1, m=200704, n=64, k=256)
    assert configs.backward_config(torch.bfloat16, GPU, direction="dgrad", **shape) == TUNED_DGRAD
    assert configs.backward_config(torch.bfloat16, GPU, direction="wgrad", **shape) == TUNED_WGRAD
    # no shape from the caller, or a shape the table lacks: the table's backward default
    assert configs.backward_config(torch.bfloat16, GPU) == TUNED_BACKWARD
    assert configs.backward_config(torch.bfloat16, GPU, direction="dgrad", ksize=3, m=1, n=2, k=3) == TUNED_BACKWARD
    # a dtype without entries: the heuristic table
    assert configs.backward_config(torch.float16, GPU) == configs.BACKWARD_GPU_CONFIGS[True]


def test_strategy_order_forced_env_table_heuristic(fake_gpu, monkeypatch):
    assert configs.conv3x3_strategy(50176, 128, 1152, torch.bfloat16, GPU) == "fused"  # the table
    assert configs.conv3x3_strategy(50176, 64, 576, torch.bfloat16, GPU) == "hybrid"   # heuristic
    monkeypatch.setenv(configs.STRATEGY_ENV, "hybrid")
    assert configs.conv3x3_strategy(50176, 128, 1152, torch.bfloat16, GPU) == "hybrid"  # env over table


def test_unreadable_and_foreign_tables_are_ignored(fake_gpu):
    assert set(tuned.load_tables()) == {NAME}


def test_every_candidate_is_compiled_ahead_of_time():
    """A tuned table can name any candidate, so the AOT list holds them all."""
    aot = {(k, d, c) for k, d, c in configs.all_conv_configs()}
    for (ksize, sixteen), candidates in configs.TUNE_CONV_CANDIDATES.items():
        for dtype in ((torch.bfloat16, torch.float16) if sixteen else (torch.float32,)):
            for c in candidates:
                assert (ksize, dtype, c) in aot
    backward = set(configs.all_backward_configs())
    for sixteen, candidates in configs.TUNE_BACKWARD_CANDIDATES.items():
        for dtype in ((torch.bfloat16, torch.float16) if sixteen else (torch.float32,)):
            for c in candidates:
                assert (dtype, c) in backward
    # every candidate fits sm_90's shared memory in 16 bits (the AOT test checks the compiled size)
    for (ksize, sixteen), candidates in configs.TUNE_CONV_CANDIDATES.items():
        for c in candidates:
            assert configs.shared_memory_bytes(c, 2 if sixteen else 4) <= configs.SHARED_MEMORY_LIMITS[(9, 0)]
    # and every backward candidate, under the backward GEMMs' larger factor
    for sixteen, candidates in configs.TUNE_BACKWARD_CANDIDATES.items():
        for c in candidates:
            assert configs.shared_memory_bytes(c, 2 if sixteen else 4, backward=True) <= \
                configs.SHARED_MEMORY_LIMITS[(9, 0)], c


def test_committed_tables_name_only_candidates():
    """Every committed table (written by scripts/gpu_tune.py on a GPU) loads and names only
    configs the AOT test compiles."""
    tables = sorted(p for p in (ROOT / "resnet_fused" / "tuned").glob("*.json") if p.name != tuned.AUTO_TABLE_FILE)
    conv = [asdict(c) for _, _, c in configs.all_conv_configs()]
    backward = [asdict(c) for _, c in configs.all_backward_configs()]
    for path in tables:
        data = json.loads(path.read_text())
        assert data["schema"] == tuned.SCHEMA and data["device_slug"] == path.stem, path
        assert not data.get("dry_run"), f"{path}: a dry run's table must not be committed"
        for entry in data["entries"]:
            if entry["direction"] == "forward":
                assert entry["config"] in conv, (path, entry)
            elif entry["direction"] in ("dgrad", "wgrad", "backward"):
                assert entry["config"] in backward, (path, entry)
            else:
                assert entry["strategy"] in configs.STRATEGIES


def test_auto_cuda_table_is_the_derived_file():
    """AUTO_CUDA_TABLE comes from resnet_fused/tuned/auto_cuda_table.json, which is exactly what
    scripts/derive_auto_table.py derives from the committed runs (no hand edits)."""
    from resnet_fused import backends

    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "derive_auto_table.py"), "--check"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert backends.AUTO_CUDA_TABLE == tuned.auto_cuda_table()


def test_readme_results_section_is_generated():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_results.py"), "--check"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (ROOT / "README.md").read_text()
    results = text.split("<!-- results:begin", 1)[1].split("<!-- results:end -->", 1)[0]
    if not any((ROOT / "benchmarks" / "results").glob("*/bench.json")):
        assert "Nothing has been measured on a GPU yet" in results


def quick_run(folder: Path, device_name: str, cuda_ms: float, triton_ms: float, cuda_parity: str = "pass",
              triton_parity: str = "pass") -> Path:
    """A minimal quick run's records, as scripts/gpu_check.sh writes them."""
    folder.mkdir(parents=True)
    env = {"device": "cuda", "device_name": device_name, "capability": "9.0", "commit": "abc", "torch": "2.11.0",
           "triton": "3.6.0"}
    rows = []
    for unit in ("conv2_x.identity", "conv3_x.first"):
        for impl, ms in (("eager", 3.0), ("compile", 2.5), ("triton", triton_ms), ("cuda", cuda_ms)):
            rows.append({"block": "bottleneck", "label": f"bottleneck:{unit}", "unit": unit, "dtype": "bf16",
                         "mode": "train_fwd_bwd", "impl": impl, "status": "ok", "median_ms": ms,
                         "speedup_vs_eager": 3.0 / ms, "speedup_vs_compile": 2.5 / ms})
    bench = {"what": "bench_blocks", "environment": env, "rows": rows, "complete": True,
             "config": {"memory_format": "channels_last", "resolved": {"batch": 256, "dtypes": ["bf16"]}}}
    parity = {"what": "parity", "config": {"batch": 32, "dtypes": ["bfloat16"]}, "cases": [],
              "summary": {"cuda": {"bfloat16": cuda_parity}, "triton": {"bfloat16": triton_parity}}}
    for name, result in (("bench", bench), ("parity", parity)):
        (folder / f"{name}.json").write_text(json.dumps({"phase": name, "status": "ok", "result": result}))
    return folder


def test_derive_auto_table_rule(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import derive_auto_table
    finally:
        sys.path.pop(0)
    faster = quick_run(tmp_path / "20270101-000000_H200_quick", "NVIDIA H200", cuda_ms=1.0, triton_ms=2.0)
    slower = quick_run(tmp_path / "20270101-000001_H200_quick", "NVIDIA H200", cuda_ms=2.0, triton_ms=1.0)
    wrong = quick_run(tmp_path / "20270101-000002_H200_quick", "NVIDIA H200", cuda_ms=1.0, triton_ms=2.0,
                      cuda_parity="fail")
    triton_wrong = quick_run(tmp_path / "20270101-000003_H200_quick", "NVIDIA H200", cuda_ms=2.0, triton_ms=1.0,
                             triton_parity="fail")
    for runs, wins in (([faster], True), ([slower], False), ([wrong], False), ([triton_wrong], True),
                       ([faster, slower], False)):  # the newest run decides
        entries = derive_auto_table.derive(runs)
        assert [(e["capability"], e["dtype"], e["block"], e["cuda_wins"]) for e in entries] == \
            [("9.0", "bfloat16", "bottleneck", wins)], runs
    out = tmp_path / "auto.json"
    assert derive_auto_table.main([str(faster), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["entries"][0]["cuda_wins"] is True


def test_readme_results_from_a_run(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import readme_results
    finally:
        sys.path.pop(0)
    run = quick_run(tmp_path / "20270101-000000_H200_quick", "NVIDIA H200", cuda_ms=1.0, triton_ms=2.0,
                    triton_parity="fail")
    body = readme_results.section([run])
    assert "NVIDIA H200" in body and "| triton | fail |" in body.replace("FAIL", "fail")
    lines = [line for line in body.splitlines() if "bottleneck:conv2_x.identity" in line]
    assert lines and "invalid: parity" in lines[0].split("|")[5] and "invalid" not in lines[0].split("|")[6]
    readme = "# x\n\n## Results\n\nold text\n\n## Layout\n\nrest\n"
    once = readme_results.render(readme, body)
    assert "old text" not in once and once.endswith("## Layout\n\nrest\n")
    assert readme_results.render(once, body) == once


def test_kernel_set_asks_the_table_with_the_forward_gemm_shape(monkeypatch):
    """The Triton kernel set keys dgrad / wgrad by the forward GEMM's (ksize, m, n, k), the key
    scripts/gpu_tune.py writes (Gemm.forward_shape); the launchers themselves are stubbed."""
    from resnet_fused.triton import kernel_set

    asked = []

    def spy(dtype, device, **key):
        asked.append(key)
        return configs.BackwardConfig(16, 16, 16, 4, 1)

    monkeypatch.setattr(configs, "backward_config", spy)
    monkeypatch.setattr(kernel_set, "conv_dgrad", lambda *a, **k: None)
    monkeypatch.setattr(kernel_set, "conv_wgrad", lambda *a, **k: None)
    # a grouped, strided 3x3: input 2x32x9x9, weight 48x(32/4)x3x3, output 2x48x5x5
    grad, v = torch.empty(2, 48, 5, 5), torch.empty(2, 32, 9, 9)
    weight = torch.empty(48, 8, 3, 3)
    c = torch.empty(32)
    kernel_set.TRITON.conv_dgrad(grad, weight, v, c, c, c, c, stride=2, groups=4)
    kernel_set.TRITON.conv_wgrad(grad, v, c, c, ksize=3, stride=2, groups=4)
    expected = dict(ksize=3, m=2 * 5 * 5, n=48 // 4, k=32 // 4 * 9)
    assert asked == [dict(direction="dgrad", **expected), dict(direction="wgrad", **expected)]
