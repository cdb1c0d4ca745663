"""Derives ``AUTO_CUDA_TABLE`` (where ``backend="auto"`` runs the CUDA C++ blocks instead of
Triton) from committed GPU quick runs: resnet_fused/tuned/auto_cuda_table.json. Never edit that
file by hand; rerun this after committing a run.

    python scripts/derive_auto_table.py                       # every run under benchmarks/results/
    python scripts/derive_auto_table.py RUN_DIR [RUN_DIR...] [--out FILE] [--check]

A run folder holds a quick run's records (``bench.json`` and ``parity.json``, as
``scripts/gpu_check.sh quick`` writes them to $OUT; see benchmarks/results/README.md). The
rule, per (compute capability, dtype, block family) of the benchmark's ``train_fwd_bwd`` rows:
``cuda_wins`` when the cuda backend passed the real-shape parity in that dtype and either it is
faster than triton on every unit measured by both, or triton failed that parity. The newest run
of a device decides for its capability. ``--check`` exits 1 when the file on disk differs from
what the runs give (a hand edit, or a run committed without rerunning this); the tests run it.

Standard library only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OUT = ROOT / "resnet_fused" / "tuned" / "auto_cuda_table.json"
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "amp-bf16": "bfloat16",
               "amp-fp16": "float16"}
RULE = ("cuda beats triton in train_fwd_bwd on every unit measured for the block family, dtype and device, "
        "both backends' parity passed in that dtype (or triton's failed and cuda's passed)")


def _result(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and "phase" in data and "result" in data:
        data = data["result"]
    return data if isinstance(data, dict) else None


def run_dirs(base: Path = RESULTS) -> list[Path]:
    """Folders under ``base`` that hold a quick run's bench.json, oldest first (by name: the
    folders start with the run's date)."""
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and (p / "bench.json").exists())


def parity_passed(parity: Optional[dict], backend: str, dtype: str) -> bool:
    if not parity or parity.get("dry_run"):
        return False
    return (parity.get("summary") or {}).get(backend, {}).get(dtype) == "pass"


def derive(runs: list[Path]) -> list[dict[str, Any]]:
    entries: dict[tuple[str, str, str], dict[str, Any]] = {}
    for run in runs:
        bench, parity = _result(run / "bench.json"), _result(run / "parity.json")
        if not bench or bench.get("environment", {}).get("device") != "cuda":
            continue  # CPU and dry runs say nothing about a GPU
        env = bench["environment"]
        capability = str(env.get("capability"))
        rows = [r for r in bench.get("rows", []) if r.get("mode") == "train_fwd_bwd" and r.get("status") == "ok"]
        groups: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
        for r in rows:
            dtype = DTYPE_NAMES.get(r["dtype"], r["dtype"])
            groups.setdefault((dtype, r["block"]), {}).setdefault(r["label"], {})[r["impl"]] = r["median_ms"]
        for (dtype, block), by_unit in groups.items():
            both = {u: v for u, v in by_unit.items() if "cuda" in v and "triton" in v}
            if not both:
                continue
            cuda_ok, triton_ok = parity_passed(parity, "cuda", dtype), parity_passed(parity, "triton", dtype)
            faster = all(v["cuda"] < v["triton"] for v in both.values())
            wins = cuda_ok and (faster or not triton_ok)
            entries[(capability, dtype, block)] = {
                "capability": capability, "dtype": dtype, "block": block, "cuda_wins": wins,
                "device_name": env.get("device_name"), "run": run.name, "commit": env.get("commit"),
                "units": len(both), "cuda_faster_on_every_unit": faster,
                "parity": {"cuda": cuda_ok, "triton": triton_ok},
                "ms_train_fwd_bwd": {u: v for u, v in sorted(both.items())},
            }
    return [entries[k] for k in sorted(entries)]


def table(runs: list[Path]) -> dict[str, Any]:
    return {"schema": 1, "generated_by": "scripts/derive_auto_table.py",
            "source": [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in runs] or None,
            "rule": RULE, "entries": derive(runs)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, help="quick-run folders (default: every one under "
                                                             "benchmarks/results/)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    args = parser.parse_args(argv)
    runs = [p.resolve() for p in args.runs] if args.runs else run_dirs()
    text = json.dumps(table(runs), indent=1) + "\n"
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is not what scripts/derive_auto_table.py derives from {len(runs)} run(s); "
                  "rerun it (never edit the file by hand)")
            return 1
        print(f"{args.out}: up to date ({len(runs)} run(s))")
        return 0
    args.out.write_text(text)
    wins = [e for e in json.loads(text)["entries"] if e["cuda_wins"]]
    print(f"{args.out}: {len(json.loads(text)['entries'])} entries, cuda wins {len(wins)}: "
          + ", ".join(f"{e['capability']}/{e['dtype']}/{e['block']}" for e in wins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
