"""One screen from a quick run's records: parity, block speedups, the model rows.

    python scripts/gpu_summary.py OUT_DIR          # the folder of build/parity/bench/models.json
    python scripts/gpu_summary.py benchmarks/results/<run>/

Parity: pass / FAIL per fused backend and dtype. Blocks: per unit and mode, each fused
backend's speedup over eager and over torch.compile (same run); every timing of a backend whose
parity failed (or did not run) in the benchmark's dtype is marked INVALID: a fast wrong kernel is
not a result. A backend whose process failed is named with how (exception, CUDA error,
timeout). Models: images/s and peak memory per implementation, a fused model row valid only
when the AMP stage-chain parity case (the path it times) passed for its backend.

Standard library only (it must print even when torch is what broke).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "amp-bf16": "bfloat16",
               "amp-fp16": "float16"}
FUSED = ("triton", "cuda")


def load(folder: Path, part: str) -> Optional[dict]:
    path = folder / f"{part}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"status": f"unreadable: {exc}"}


def result_of(record: Optional[dict]) -> Optional[dict]:
    """A part's output: the record's embedded ``result``, or the file itself when it is one."""
    if not record:
        return None
    if "result" in record and "phase" in record:
        return record["result"] if isinstance(record["result"], dict) else None
    return record


def parity_verdicts(parity: Optional[dict]) -> dict[tuple[str, str], str]:
    """{(backend, dtype): "pass" | "FAIL" | "not run"}: pass only when at least one case ran
    and every case that ran passed."""
    verdicts: dict[tuple[str, str], str] = {}
    if not parity:
        return verdicts
    for backend, by_dtype in (parity.get("summary") or {}).items():
        for dtype, status in by_dtype.items():
            verdicts[(backend, dtype)] = {"pass": "pass", "fail": "FAIL", "error": "FAIL"}.get(status, "not run")
    return verdicts


def stage_verdicts(parity: Optional[dict]) -> dict[str, str]:
    """{backend: "pass" | "FAIL" | "not run"} of the stage-chain cases (family ``stage``)."""
    out: dict[str, str] = {}
    for case in (parity or {}).get("cases", []):
        if case.get("family") != "stage" or case.get("status") not in ("pass", "fail", "error"):
            continue
        previous = out.get(case["backend"], "pass")
        out[case["backend"]] = "pass" if previous == "pass" and case["status"] == "pass" else "FAIL"
    return out


def fmt(value: Any, spec: str = ".3g") -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def summary_lines(folder: Path) -> list[str]:
    lines: list[str] = []
    records = {p: load(folder, p) for p in ("build", "parity", "bench", "models", "tune")}
    parity, bench, models = (result_of(records[p]) for p in ("parity", "bench", "models"))
    env = next((r.get("environment") for r in (bench, models, parity) if r and r.get("environment")), {}) or {}
    lines.append(f"=== gpu_check summary: {env.get('device_name', '?')}, torch {env.get('torch', '?')}, "
                 f"triton {env.get('triton', '?')}, commit {str(env.get('commit', '?'))[:12]}")
    for part, record in records.items():
        if record is None:
            continue
        status = record.get("status", "?")
        lines.append(f"{part}: {status} ({fmt(record.get('seconds'), '.0f')} s)"
                     + (" [dry run]" if record.get("dry_run") else ""))

    verdicts = parity_verdicts(parity)
    if parity:
        dtypes = parity.get("config", {}).get("dtypes") or sorted({d for _, d in verdicts})
        lines.append(f"parity (batch {parity.get('config', {}).get('batch')}, real unit shapes, eager-relative "
                     f"rule; complete={parity.get('complete')}):")
        lines.append("  backend  " + "".join(f"{d:>22}" for d in dtypes))
        for backend in FUSED:
            cells = []
            for dtype in dtypes:
                cases = [c for c in parity.get("cases", []) if c.get("backend") == backend and c.get("dtype") == dtype]
                ran = [c for c in cases if c.get("status") in ("pass", "fail", "error")]
                bad = [c for c in ran if c.get("status") != "pass"]
                verdict = verdicts.get((backend, dtype), "not run")
                cells.append(f"{verdict} ({len(ran) - len(bad)}/{len(ran)} ran, {len(cases) - len(ran)} not)")
            lines.append(f"  {backend:<8} " + "".join(f"{c:>22}" for c in cells))
        for case in parity.get("cases", []):
            if case.get("status") in ("fail", "error"):
                lines.append(f"    {case['backend']} {case['dtype']} {case['label']}: {case['status']}: "
                             f"{str(case.get('reason'))[:110]}")
        for backend, failure in (parity.get("backend_failures") or {}).items():
            lines.append(f"  parity: {backend} FAILED ({failure.get('kind')}): {str(failure.get('reason'))[:160]}")

    if bench and bench.get("rows"):
        rows = [r for r in bench["rows"] if r.get("status") == "ok"]
        resolved = bench.get("config", {}).get("resolved", {})
        lines.append(f"blocks ({','.join(resolved.get('dtypes', []))}, {bench.get('config', {}).get('memory_format')}, "
                     f"batch {resolved.get('batch')}; speedup = eager or compile ms / this ms; complete="
                     f"{bench.get('complete')}):")
        lines.append(f"  {'unit':<28}{'mode':<15}{'eager ms':>10}{'compile ms':>11}"
                     + "".join(f"{b + ' x eager/x compile':>30}" for b in FUSED))
        cases = list(dict.fromkeys((r["label"], r["dtype"], r["mode"]) for r in bench["rows"]))
        for label, dtype, mode in cases:
            mine = {r["impl"]: r for r in rows if (r["label"], r["dtype"], r["mode"]) == (label, dtype, mode)}
            cells = []
            for backend in FUSED:
                row = mine.get(backend)
                if row is None:
                    other = next((r for r in bench["rows"] if (r["label"], r["dtype"], r["mode"], r["impl"])
                                  == (label, dtype, mode, backend)), None)
                    cells.append(other.get("status", "-") if other else "-")
                    continue
                text = f"{fmt(row.get('speedup_vs_eager'))}x/{fmt(row.get('speedup_vs_compile'))}x"
                if verdicts.get((backend, DTYPE_NAMES.get(dtype, dtype))) != "pass":
                    text = "INVALID " + text
                cells.append(text)
            eager_ms = mine.get("eager", {}).get("median_ms")
            compile_ms = mine.get("compile", {}).get("median_ms")
            lines.append(f"  {label:<28}{mode:<15}{fmt(eager_ms, '.4g'):>10}{fmt(compile_ms, '.4g'):>11}"
                         + "".join(f"{c:>30}" for c in cells))
        skipped = [r for r in bench["rows"] if r.get("status") == "skipped"]
        if skipped:
            lines.append(f"  {len(skipped)} rows skipped by the budget ({', '.join(sorted({r['impl'] for r in skipped}))})")
        for backend, failure in (bench.get("backend_failures") or {}).items():
            lines.append(f"  blocks: {backend} FAILED ({failure.get('kind')}): {str(failure.get('reason'))[:160]}")
        invalid = sorted({b for b in FUSED for d in resolved.get("dtypes", [])
                          if verdicts.get((b, DTYPE_NAMES.get(d, d))) != "pass"})
        if invalid:
            lines.append(f"  INVALID: {', '.join(invalid)} did not pass parity in the benchmark's dtype")

    if models and models.get("rows"):
        lines.append("model (train step; fused rows valid only under the AMP stage-chain parity case):")
        stage = stage_verdicts(parity)
        for r in models["rows"]:
            if r.get("what") != "throughput":
                continue
            mark = ""
            if r["impl"] in FUSED and stage.get(r["impl"]) != "pass":
                mark = f" INVALID (stage-chain parity: {stage.get(r['impl'], 'not run')})"
            if r.get("status") == "ok":
                lines.append(f"  {r['model']} {r['mode']} {r['dtype']} b{r['batch']} {r['impl']:<8} "
                             f"{fmt(r.get('images_per_s'), '.4g')} img/s, peak {fmt(r.get('peak_mib'), '.0f')} MiB, "
                             f"x eager {fmt(r.get('speedup_vs_eager'))}{mark}")
            else:
                lines.append(f"  {r['model']} {r['mode']} {r['impl']}: {r.get('status')}: {str(r.get('reason'))[:100]}")
    tune = result_of(records["tune"])
    if tune and "entries" in tune:
        lines.append(f"tune: {len(tune['entries'])} entries for {tune.get('device_name')!r}, "
                     f"{len(tune.get('skipped', []))} skipped; complete={tune.get('complete')}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    for line in summary_lines(Path(argv[0])):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
