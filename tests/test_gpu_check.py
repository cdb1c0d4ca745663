"""scripts/gpu_check.sh on the CPU: the dry run of ``quick`` and ``tune`` (every part at tiny
sizes, then scripts/gpu_check_verify.py over $OUT), the verifier itself, the argument splitting,
and the single phases' command lines (through a stand-in Python that records them).

A GPU machine's command runs only once and for minutes; a typo in the script must fail here.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "scripts"))
import file_gpu_results  # noqa: E402
import gpu_check_verify  # noqa: E402
import gpu_plan  # noqa: E402
import parity_rule  # noqa: E402

sys.path.pop(0)

from benchmarks import faults, isolate  # noqa: E402

#: The faults the dry-run test injects: one C++ op of the cuda backend raises a CUDA error, and
#: the model benchmark's fused model gets a block back as eager.
DRY_RUN_FAULT = "cuda:conv_fwd,model:eager-block"


def script_env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ARGS", "BENCH_ARGS", "MODELS_ARGS",
                                                            "MODELS_CLASSIC", "GPU_CHECK_DRY_RUN")}
    env.update(OUT=str(tmp_path / "out"), PYTHON=sys.executable, RESNET_FUSED_COMMIT="test-commit",
               TMPDIR=str(tmp_path))
    env.update(extra)
    return env


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_dry_run_quick_and_tune(tmp_path):
    """The whole flow at tiny sizes, with a CUDA fault injected into one C++ op and a model
    block left eager: build (skipped when _C loads), parity (one process per backend, the AMP
    stage chain included), block and model benchmarks, the summary, the tuning sweep; then the
    verifier's checks (at most 8 files, flat), the GPU plan's predicted times against its
    budgets, and the filing of what came back (on scratch copies)."""
    env = script_env(tmp_path, GPU_CHECK_DRY_RUN_FAULT=DRY_RUN_FAULT)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "quick", "tune"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "gpu_check_verify:" in output and " ok (" in output, output[-3000:]
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["build.json", "parity.json", "bench.json", "models.json", "sanitize.json", "tune.json",
                            "tuned.json", "logs.tar.gz"])
    assert all(p.is_file() for p in out.iterdir())  # nothing nested comes back
    # the one-screen summary ran and said what parity gave, and which backend failed and how
    assert "parity (batch" in output and "triton" in output
    assert "parity: cuda FAILED (cuda error)" in output and "blocks: cuda FAILED (cuda error)" in output
    # the fault in the cuda backend left every triton result valid, the cuda failure named
    parity = json.loads((out / "parity.json").read_text())["result"]
    assert parity["config"]["isolation"] == "one process per backend"
    triton_cases = [c for c in parity["cases"] if c["backend"] == "triton"]
    cuda_cases = [c for c in parity["cases"] if c["backend"] == "cuda"]
    assert triton_cases and all(c["status"] == "pass" for c in triton_cases)
    assert cuda_cases and all(c["status"] == "error" and c["failure"] == "cuda error" for c in cuda_cases)
    assert "illegal memory access" in parity["backend_failures"]["cuda"]["reason"]
    assert parity["summary"]["triton"] == {"float16": "pass", "float32": "pass", "amp-fp16": "pass"}
    # the AMP stage-chain case ran, through the same rule, with chained statistics
    stage = [c for c in triton_cases if c["family"] == "stage"]
    assert stage and stage[0]["dtype"] == "amp-fp16" and stage[0]["checks"]
    bench = json.loads((out / "bench.json").read_text())["result"]
    rows = {(r["impl"], r["status"]) for r in bench["rows"]}
    assert ("cuda", "ok") not in rows and ("triton", "ok") in rows
    # no triton or eager row failed (the budget may skip some on a busy machine: not a failure)
    assert all(r["status"] in ("ok", "skipped") for r in bench["rows"] if r["impl"] in ("triton", "eager"))
    assert bench["backend_failures"]["cuda"]["kind"] == "cuda error"
    for row in bench["rows"]:
        if row["status"] == "ok":
            assert isinstance(row["host_ms"], float)
            if row["impl"] == "triton":
                assert row["warmup_launches"]["triton"] > 0 and row["warmup_launches"]["cuda"] == 0
    # a model with a block left eager is an error row, not a timing
    models = json.loads((out / "models.json").read_text())["result"]
    fused = [r for r in models["rows"] if r["impl"] == "cuda"]
    assert fused and all(r["status"] == "error" and "run eager" in r["reason"] for r in fused)
    # the GPU plan's predicted times are within its budgets
    assert "gpu_plan: ok" in output
    # filing: the results folder, the tuned table, AUTO_CUDA_TABLE and the README section. The
    # README shows GPU runs only: the filed copy's benchmark says it ran on one.
    record = json.loads((out / "bench.json").read_text())
    record["result"]["environment"].update(device="cuda", device_name="Dry-run stand-in GPU")
    (out / "bench.json").write_text(json.dumps(record))
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    before = readme.read_text()
    folder = file_gpu_results.file_results(out, tmp_path / "results", tmp_path / "tuned", readme,
                                           tmp_path / "auto_cuda_table.json")
    assert folder.parent == tmp_path / "results" and folder.name.endswith("-dry-run_quick")
    assert sorted(p.name for p in folder.iterdir()) == sorted(n for n in names)
    assert (tmp_path / "auto_cuda_table.json").exists()
    assert len(list((tmp_path / "tuned").glob("*.json"))) == 1
    after = readme.read_text()
    assert after != before and "<!-- results:begin" in after and "### Dry-run stand-in GPU" in after
    assert folder.name in after and "| triton |" in after
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = {Path(m.name).name for m in tar.getmembers() if m.isfile()}
    assert {"build.log", "parity.log", "bench.log", "models.log", "summary.log", "tune.log"} <= logs
    # the tuned table is one the package reads
    table = json.loads((out / "tuned.json").read_text())
    folder = tmp_path / "tables"
    folder.mkdir()
    (folder / f"{table['device_slug']}.json").write_text(json.dumps(table))
    check = subprocess.run(
        [sys.executable, "-c", "from resnet_fused import tuned; t = tuned.load_tables(); "
                               "print(sorted(t), len(t['cpu (dry run)']['entries']))"],
        env={**env, "RESNET_FUSED_TUNED_DIR": str(folder)}, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "['cpu (dry run)']" in check.stdout, check.stdout + check.stderr


def test_child_timeout_and_failure_kinds(tmp_path):
    """A backend's process that hangs is killed at its timeout and named a timeout; error texts
    are told apart (CUDA error, crash, exception)."""
    rc, timed_out, tail, seconds = isolate.run_child(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], timeout=2)
    assert timed_out and seconds < 30 and "started" in tail
    failure = isolate.failure(rc, timed_out, tail, seconds, complete=False)
    assert failure["kind"] == "timeout" and "killed after" in failure["reason"]
    rc, timed_out, tail, seconds = isolate.run_child([sys.executable, "-c", "import os; os.abort()"], timeout=30)
    assert not timed_out and isolate.failure(rc, timed_out, tail, seconds, complete=False)["kind"] == "crash"
    assert isolate.failure(0, False, "", 1.0, complete=True) is None
    assert faults.classify("RuntimeError: CUDA error: an illegal memory access was encountered") == "cuda error"
    assert faults.classify("ValueError: bad") == "exception"
    with pytest.raises(ValueError, match="expected cuda:<op>"):
        faults.parse("triton:conv")
    assert isolate.strip_options(["--a", "1", "--b=2", "--c", "3"], ("--a", "--b")) == ["--c", "3"]


def test_gpu_plan_fits_the_command():
    """The GPU quick plan's budgets sum to at most 540 s, and the prediction of each part is
    within its budget (scripts/gpu_plan.py, with the parity's own problem list)."""
    budgets = gpu_plan.gpu_plan()
    assert set(budgets) == {"build", "parity", "bench", "models", "summary"}
    assert sum(budgets.values()) <= gpu_plan.LIMIT_S
    parts = gpu_plan.predict(gpu_plan.parity_problems(), len(gpu_plan.quick_units()), 130, budgets)
    assert all(p["ok"] for p in parts.values()), parts
    assert len(gpu_plan.quick_units()) == 7


def write_records(out: Path, names: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        (out / name).write_text(json.dumps({"phase": name[:-5], "status": "ok", "rc": 0, "seconds": 1,
                                            "commit": "x", "command": "", "result": None, "log_tail": "",
                                            "schema": 1, "dry_run": False}))


def test_verify_finds_each_kind_of_problem(tmp_path):
    out = tmp_path / "out"
    write_records(out, ["build.json", "bench.json"])
    problems = gpu_check_verify.verify(out, ["quick"], 2, strict=False)
    assert any("parity.json: missing" in p for p in problems)
    assert any("logs.tar.gz: missing" in p for p in problems)
    assert any("bench.json: no benchmark result" in p for p in problems)
    (out / "stray.txt").write_text("x")
    (out / "nested").mkdir()
    for i in range(6):
        (out / f"extra{i}.log").write_text("x")
    problems = gpu_check_verify.verify(out, ["quick"], 11, strict=False)
    assert any("entries in $OUT (at most 8)" in p for p in problems)
    assert any("at one moment" in p for p in problems)
    assert any("stray.txt: an unexpected file name" in p for p in problems)
    assert any("nested: not a plain file" in p for p in problems)


def test_parity_rule_is_the_tests_rule():
    """The scripts (scripts/parity_rule.py) and the tests (tests/helpers.py) apply one rule, the
    package's resnet_fused.parity; it passes close results and fails a 1.05x one."""
    import torch
    import helpers
    from resnet_fused import parity
    from resnet_fused.parity import UNIT_ROUNDOFF, rel_err

    for name in ("UNIT_ROUNDOFF", "MAX_SPREAD_FACTOR", "rel_err", "tolerance"):
        assert getattr(parity_rule, name) is getattr(parity, name) is getattr(helpers, name), name
    assert parity.tolerance(torch.float16, 1e-3) == 2e-3 + 2 * 2.0**-11
    gen = torch.Generator().manual_seed(0)
    exact = torch.randn(64, generator=gen, dtype=torch.float64)
    close = exact + 1e-3 * torch.randn(64, generator=gen, dtype=torch.float64)
    assert rel_err(close, exact) == pytest.approx(((close - exact).norm() / exact.norm()).item())
    assert rel_err(torch.full_like(exact, float("nan")), exact) == float("inf")
    eager = (exact + 1e-3 * torch.randn(64, generator=gen, dtype=torch.float64)).half()
    good = parity_rule.check(close.half(), eager, exact, torch.float16)
    bad = parity_rule.check((exact * 1.05).half(), eager, exact, torch.float16)
    assert good["ok"] and not bad["ok"]
    # a spread widens the bound only up to 4x eager's error: never past 8x eager + 2u
    eager_err = parity_rule.rel_err(eager, exact)
    wide = parity_rule.check(close.half(), eager, exact, torch.float16, eager_spread=1.0)
    assert wide["bound"] == pytest.approx(8 * eager_err + 2 * UNIT_ROUNDOFF[torch.float16], rel=1e-3)
    nan = close.clone()
    nan[3] = float("nan")
    assert not parity_rule.check(nan, eager, exact, torch.float64)["ok"]


def test_split_args_keeps_quoted_words():
    snippet = ('source scripts/gpu_check_lib.sh; split_args a "$1"; printf "<%s>" "${a[@]}"; '
               'split_args b ""; echo " ${#b[@]}"')
    proc = subprocess.run(["bash", "-c", snippet, "bash", '-k "a or b" -x --name=\'$HOME *\''],
                          cwd=ROOT, env={**os.environ, "PY": sys.executable}, capture_output=True, text=True)
    assert proc.stdout.strip() == "<-k><a or b><-x><--name=$HOME *> 0", proc.stdout + proc.stderr


FAKE_PYTHON = """#!/usr/bin/env bash
# Records the command lines of the benchmarks, sanitize_blocks.py and pytest; runs anything else.
for a in "$@"; do
    case "$a" in
        benchmarks/*|scripts/sanitize_blocks.py)
            printf '%s\\0' "$@" > "$RECORDS/$(basename "$a").args"; exit 0 ;;
    esac
done
if [ "${1:-}" = -m ] && [ "${2:-}" = pytest ]; then printf '%s\\0' "$@" > "$RECORDS/pytest.args"; exit 0; fi
exec "$REAL_PYTHON" "$@"
"""

FAKE_SANITIZER = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$RECORDS/sanitizer.$(date +%s%N).args"
echo "========= ERROR SUMMARY: 0 errors"
"""


@pytest.fixture
def fake_tools(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    cuda = tmp_path / "cuda" / "bin"
    cuda.mkdir(parents=True)
    sanitizer = cuda / "compute-sanitizer"
    sanitizer.write_text(FAKE_SANITIZER)
    sanitizer.chmod(0o755)
    return records, python, cuda.parent


def run_phase(tmp_path, fake_tools, phase: str, **extra: str) -> subprocess.CompletedProcess:
    records, python, cuda_home = fake_tools
    env = script_env(tmp_path, PYTHON=str(python), REAL_PYTHON=sys.executable, RECORDS=str(records),
                     CUDA_HOME=str(cuda_home), **extra)
    proc = subprocess.run(["bash", str(SCRIPT), phase], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = tmp_path / "out"
    assert len(list(out.iterdir())) <= 8
    assert (out / f"{phase}.json").exists() and (out / "logs.tar.gz").exists(), proc.stdout + proc.stderr
    return proc


def recorded(records: Path, name: str) -> list[str]:
    return (records / name).read_text().split("\0")[:-1]


def test_models_phase_classic_is_optional_and_args_stay_whole(tmp_path, fake_tools):
    records = fake_tools[0]
    run_phase(tmp_path, fake_tools, "models", MODELS_ARGS='--models "resnet_v2_50,timm:resnetv2_50" --quick')
    args = recorded(records, "bench_models.py.args")
    assert "--classic" not in args
    assert args[args.index("--models") + 1] == "resnet_v2_50,timm:resnetv2_50" and "--quick" in args
    run_phase(tmp_path, fake_tools, "models", MODELS_CLASSIC="1")
    assert "--classic" in recorded(records, "bench_models.py.args")


def test_test_phase_runs_parallel_with_timeouts_and_whole_args(tmp_path, fake_tools):
    records = fake_tools[0]
    run_phase(tmp_path, fake_tools, "test", PYTEST_ARGS='-k "roofline or flops" -x')
    args = recorded(records, "pytest.args")
    assert args[args.index("-k") + 1] == "roofline or flops" and "-x" in args
    assert "-n" in args and "--timeout" in args and "--junitxml" in args


def test_bench_args_stay_whole(tmp_path, fake_tools):
    records = fake_tools[0]
    run_phase(tmp_path, fake_tools, "bench", BENCH_ARGS='--impls "eager,triton" --stages 2')
    args = recorded(records, "bench_blocks.py.args")
    assert args[args.index("--impls") + 1] == "eager,triton" and args[args.index("--stages") + 1] == "2"


def test_sanitize_covers_both_backends(tmp_path, fake_tools):
    records = fake_tools[0]
    run_phase(tmp_path, fake_tools, "sanitize")
    runs = [(records / p).read_text().split("\0") for p in os.listdir(records) if p.startswith("sanitizer.")]
    backends = sorted(r[r.index("--backend") + 1] for r in runs)
    tools = sorted(r[r.index("--tool") + 1] for r in runs)
    assert backends == ["cuda", "cuda", "triton", "triton"]
    assert tools == ["memcheck", "memcheck", "racecheck", "racecheck"]
