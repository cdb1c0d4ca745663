"""Checks what scripts/gpu_check.sh left in $OUT: the file names, at most 8 files (also the
largest count seen while it ran), and the JSON schemas of every record. The dry run calls it
last (its exit status is the run's); tests/test_gpu_check.py relies on it.

    python scripts/gpu_check_verify.py --out OUT --phase quick [--phase tune] [--max-files-seen N]
        [--fault SPEC]

``--fault`` (the dry run's GPU_CHECK_DRY_RUN_FAULT): what must have happened instead of a clean
run: with ``cuda:<op>``, every Triton parity case and benchmark row still valid, every cuda case
and row an error, the cuda failure named (kind and text) in parity's and the block benchmark's
``backend_failures``; with ``model:eager-block``, the fused model rows errors naming the eager
block.

Standard library only. Exit status 0 when everything holds, 1 with the list of problems.
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

MAX_FILES = 8
RECORD_KEYS = {"phase", "status", "rc", "seconds", "commit", "command", "result", "log_tail", "schema", "dry_run"}
#: The files each phase leaves (besides logs.tar.gz).
PHASE_FILES = {
    "quick": ["build.json", "parity.json", "bench.json", "models.json", "sanitize.json"],
    "tune": ["tune.json", "tuned.json"],
    "build": ["build.json"], "test": ["test.json"], "bench": ["bench.json"], "models": ["models.json"],
    "sanitize": ["sanitize.json"],
}
ALLOWED = {name for names in PHASE_FILES.values() for name in names} | {"logs.tar.gz"}
PARITY_STATUSES = {"pass", "fail", "error", "skipped", "unavailable"}
ROW_STATUSES = {"ok", "error", "skipped", "unavailable"}
TUNED_DIRECTIONS = {"forward", "dgrad", "wgrad", "backward", "strategy3x3"}
CONV_FIELDS = {"block_m", "block_n", "block_k", "num_warps", "num_stages"}


class Problems(list):
    def need(self, condition: Any, text: str) -> bool:
        if not condition:
            self.append(text)
        return bool(condition)


def load(path: Path, problems: Problems) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name}: not valid JSON ({exc})")
        return None


def check_record(name: str, record: Any, problems: Problems) -> None:
    if not problems.need(isinstance(record, dict), f"{name}: not a JSON object"):
        return
    missing = RECORD_KEYS - set(record)
    problems.need(not missing, f"{name}: record lacks {sorted(missing)}")
    problems.need(record.get("phase") == name[:-5], f"{name}: phase {record.get('phase')!r}")
    problems.need(record.get("schema") == 1, f"{name}: schema {record.get('schema')!r}")


def fault_parts(fault: str) -> set[str]:
    return {p.strip().split(":")[0] for p in fault.split(",") if p.strip()}


def check_parity(result: Any, strict: bool, problems: Problems, fault: str = "") -> None:
    if not problems.need(isinstance(result, dict) and result.get("what") == "parity", "parity.json: no parity result"):
        return
    cases = result.get("cases")
    if not problems.need(isinstance(cases, list) and cases, "parity.json: no cases"):
        return
    for case in cases:
        for key in ("backend", "dtype", "label", "status"):
            problems.need(key in case, f"parity.json: a case lacks {key!r}: {str(case)[:200]}")
        problems.need(case.get("status") in PARITY_STATUSES, f"parity.json: status {case.get('status')!r}")
        if case.get("status") in ("pass", "fail"):
            problems.need(isinstance(case.get("checks"), list) and case["checks"], "parity.json: a case without checks")
            problems.need("launches" in case and "other_backend_launches" in case, "parity.json: no launch counts")
            for check in case.get("checks", []):
                missing = {"what", "ok", "fused_err", "eager_err", "bound"} - set(check)
                problems.need(not missing, f"parity.json: a check lacks {sorted(missing)}")
    problems.need(isinstance(result.get("summary"), dict), "parity.json: no summary")
    if strict:
        problems.need(result.get("complete") is True, "parity.json: not complete")
        faulty = {"cuda"} if "cuda" in fault_parts(fault) else set()
        for backend in ("triton", "cuda"):
            ran = [c for c in cases if c.get("backend") == backend and c.get("status") in ("pass", "fail", "error")]
            problems.need(ran, f"parity.json: no {backend} case ran")
            if backend in faulty:
                problems.need(all(c["status"] == "error" and c.get("failure") for c in ran),
                              f"parity.json: {backend} has a fault injected, yet cases did not fail with a named kind")
                named = (result.get("backend_failures") or {}).get(backend) or {}
                problems.need(named.get("kind") and named.get("reason"),
                              f"parity.json: no backend_failures entry naming how {backend} failed")
                continue
            problems.need(all(c["status"] == "pass" for c in ran),
                          f"parity.json: {backend} cases failed: {[c.get('reason') for c in ran if c['status'] != 'pass']}")
        problems.need(any(c.get("family") == "stage" and c.get("status") in ("pass", "fail", "error") for c in cases),
                      "parity.json: the stage-chain case did not run")
        names = {c.get("what") for c in cases for c in c.get("checks", [])}
        for what in ("eval.output", "train.output", "train.grad.input"):
            problems.need(what in names, f"parity.json: no {what} comparison")
        problems.need(any(n.startswith("train.grad.conv") for n in names), "parity.json: no parameter gradient")
        problems.need(any(n.endswith("running_var") for n in names), "parity.json: no running statistics")


def check_rows(name: str, result: Any, strict: bool, required_ok: list[str], problems: Problems,
               fault: str = "") -> None:
    if not problems.need(isinstance(result, dict) and isinstance(result.get("rows"), list),
                         f"{name}: no benchmark result with rows"):
        return
    rows = result["rows"]
    problems.need(rows, f"{name}: no rows")
    for row in rows:
        missing = {"impl", "dtype", "mode", "status"} - set(row)
        problems.need(not missing, f"{name}: a row lacks {sorted(missing)}")
        problems.need(row.get("status") in ROW_STATUSES, f"{name}: row status {row.get('status')!r}")
        if row.get("status") == "ok":
            problems.need(isinstance(row.get("median_ms"), (int, float)), f"{name}: an ok row without median_ms")
        elif row.get("status") in ("skipped", "unavailable", "error"):
            problems.need(row.get("reason"), f"{name}: a {row.get('status')} row without a reason")
    problems.need(isinstance(result.get("environment"), dict), f"{name}: no environment")
    for row in rows:
        if row.get("status") == "ok" and row.get("impl") in ("triton", "cuda"):
            problems.need((row.get("warmup_launches") or {}).get(row["impl"]),
                          f"{name}: a {row['impl']} row timed without the proof of its launches")
            problems.need(isinstance(row.get("host_ms"), (int, float)), f"{name}: an ok row without host_ms")
    if strict:
        problems.need(result.get("complete") is True, f"{name}: not complete")
        for impl in required_ok:
            problems.need(any(r.get("impl") == impl and r.get("status") == "ok" for r in rows),
                          f"{name}: no measured {impl} row")
        parts = fault_parts(fault)
        cuda_rows = [r for r in rows if r.get("impl") == "cuda"]
        if "cuda" in parts and name == "bench.json":
            problems.need(cuda_rows and all(r.get("status") == "error" for r in cuda_rows),
                          f"{name}: a cuda fault was injected, yet cuda rows were not errors")
            named = (result.get("backend_failures") or {}).get("cuda") or {}
            problems.need(named.get("kind") and named.get("reason"), f"{name}: no backend_failures entry for cuda")
            triton = [r for r in rows if r.get("impl") == "triton"]
            problems.need(any(r.get("status") == "ok" for r in triton)
                          and all(r.get("status") in ("ok", "skipped") for r in triton),
                          f"{name}: triton rows lost to the cuda fault: {[r.get('reason') for r in triton if r.get('status') == 'error'][:2]}")
        if "model" in parts and name == "models.json":
            fused = [r for r in rows if r.get("impl") in ("triton", "cuda")]
            problems.need(fused and all(r.get("status") == "error" and "eager" in str(r.get("reason")) for r in fused),
                          f"{name}: a model with a block left eager was not recorded as an error")


def check_tuned(table: Any, strict: bool, problems: Problems) -> None:
    if not problems.need(isinstance(table, dict), "tuned.json: not a JSON object"):
        return
    for key in ("schema", "device_name", "device_slug", "entries", "measurements", "complete"):
        problems.need(key in table, f"tuned.json: lacks {key!r}")
    for entry in table.get("entries", []):
        direction = entry.get("direction")
        problems.need(direction in TUNED_DIRECTIONS, f"tuned.json: direction {direction!r}")
        problems.need(entry.get("dtype") in ("bfloat16", "float16", "float32"), f"tuned.json: dtype {entry.get('dtype')!r}")
        if direction == "strategy3x3":
            problems.need(entry.get("strategy") in ("fused", "hybrid"), "tuned.json: a strategy entry without a strategy")
        else:
            problems.need(set(entry.get("config", {})) == CONV_FIELDS, f"tuned.json: config {entry.get('config')}")
        if direction not in ("backward",):
            for key in ("m", "n", "k"):
                problems.need(isinstance(entry.get(key), int), f"tuned.json: {direction} entry without {key}")
    if strict:
        seen = {e.get("direction") for e in table.get("entries", [])}
        problems.need(seen == TUNED_DIRECTIONS, f"tuned.json: directions {sorted(seen)}, want {sorted(TUNED_DIRECTIONS)}")
        bad = [m for m in table.get("measurements", []) if m.get("status") in ("wrong result", "error")]
        problems.need(not bad, f"tuned.json: candidates rejected: {[str(m)[:200] for m in bad[:3]]}")


def verify(out: Path, phases: list[str], max_files_seen: int, strict: bool, fault: str = "") -> Problems:
    problems = Problems()
    entries = sorted(out.iterdir()) if out.is_dir() else []
    names = [p.name for p in entries]
    problems.need(len(entries) <= MAX_FILES, f"{len(entries)} entries in $OUT (at most {MAX_FILES}): {names}")
    problems.need(max_files_seen <= MAX_FILES, f"{max_files_seen} entries in $OUT at one moment (at most {MAX_FILES})")
    for p in entries:
        problems.need(p.is_file(), f"{p.name}: not a plain file (nothing nested may come back)")
        problems.need(p.name in ALLOWED, f"{p.name}: an unexpected file name")
    expected = {name for phase in phases for name in PHASE_FILES[phase]} | {"logs.tar.gz"}
    if "tune" in phases and "build.json" in names:
        expected.add("build.json")  # tune builds first when _C is missing
    for name in sorted(expected):
        problems.need(name in names, f"{name}: missing")
    for name in names:
        if name.endswith(".json") and name != "tuned.json":
            record = load(out / name, problems)
            check_record(name, record, problems)
            if not isinstance(record, dict):
                continue
            result = record.get("result")
            # a part that an injected fault fails, and the opportunistic memcheck, need not be ok
            exempt = {"build.json", "sanitize.json"} | ({"parity.json", "bench.json", "models.json"} if fault else set())
            if strict and name not in exempt:
                problems.need(record.get("status") == "ok", f"{name}: status {record.get('status')!r}, rc {record.get('rc')}")
            if name == "parity.json":
                check_parity(result, strict, problems, fault)
            elif name == "bench.json":
                check_rows(name, result, strict, ["eager", "triton"], problems, fault)
            elif name == "models.json":
                check_rows(name, result, strict, ["eager"], problems, fault)
            elif name == "build.json":
                problems.need(isinstance(result, dict) and "extension_loads" in result, "build.json: no build check")
            elif name == "tune.json":
                check_tuned(result, strict, problems)
    if "tuned.json" in names:
        check_tuned(load(out / "tuned.json", problems), strict, problems)
    if "logs.tar.gz" in names:
        try:
            with tarfile.open(out / "logs.tar.gz") as tar:
                logs = {Path(m.name).name for m in tar.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError) as exc:
            problems.append(f"logs.tar.gz: unreadable ({exc})")
        else:
            for name in sorted(expected):
                if name.endswith(".json") and name != "tuned.json":
                    problems.need(f"{name[:-5]}.log" in logs, f"logs.tar.gz: no {name[:-5]}.log (has {sorted(logs)})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--phase", action="append", default=[], choices=sorted(PHASE_FILES))
    parser.add_argument("--max-files-seen", type=int, default=0)
    parser.add_argument("--fault", default="", help="the faults the dry run injected (GPU_CHECK_DRY_RUN_FAULT)")
    parser.add_argument("--lenient", action="store_true",
                        help="schema only (a GPU run's output): failures and incomplete parts are not problems")
    args = parser.parse_args(argv)
    problems = verify(Path(args.out), args.phase or ["quick"], args.max_files_seen, strict=not args.lenient,
                      fault=args.fault)
    if problems:
        print(f"gpu_check_verify: {len(problems)} problem(s) in {args.out}:")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"gpu_check_verify: {args.out} ok ({', '.join(sorted(p.name for p in Path(args.out).iterdir()))}; "
          f"at most {args.max_files_seen} entries seen while running)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
