"""Writes one phase's record for scripts/gpu_check.sh: ``$OUT/<phase>.json``, and prints the
phase's one-line summary (the script collects them and prints them last). The phases: build,
test, bench, models, sanitize and the quick run's parity; tune.

The record is always written, whatever happened: status (``ok``, ``failed``, ``timeout``,
``clean``, ``errors``, ``not run``), exit code, seconds, the commit, the tail of the log, and
what the phase produced (the benchmark's JSON, the JUnit summary, the build check, the
sanitizer's error summaries) embedded, so that one file per phase carries everything.

Uses only the standard library: it must work when torch itself is what is broken.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Optional

LOG_TAIL_CHARS = 8000
#: The most of an attached text file kept (its end).
ATTACH_CHARS = 60000
#: How many failing tests are named in the record (each with the start of its message).
MAX_FAILURES = 40


def read_tail(path: Optional[str], chars: int = LOG_TAIL_CHARS) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - chars))
        return f.read().decode("utf-8", errors="replace")


def load_json(path: Optional[str]) -> Any:
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        return {"unreadable": f"{type(exc).__name__}: {exc}"}


def junit_summary(path: Optional[str]) -> Optional[dict]:
    """Counts, failing tests with the start of their messages, and skip reasons."""
    if not path or not os.path.exists(path):
        return None
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        return {"unreadable": str(exc)}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["seconds"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    failed, skip_reasons = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag in ("failure", "error"):
            for element in case.findall(tag):
                message = (element.get("message") or element.text or "").strip()
                failed.append({"test": name, "kind": tag, "message": message[:600]})
        for element in case.findall("skipped"):
            reason = (element.get("message") or "").strip()[:200]
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed[:MAX_FAILURES], "failed_total": len(failed),
            "skip_reasons": dict(sorted(skip_reasons.items(), key=lambda kv: -kv[1]))}


def sanitizer_summary(tool: str, log_path: str, rc: int) -> dict:
    """Whether compute-sanitizer really ran the program to the end, and its error count.

    "clean" needs all three: the program's completion marker, an "ERROR SUMMARY: 0 errors"
    line and exit status 0. Anything less is "errors" or "not run", never "clean".
    """
    text = read_tail(log_path, 200_000)
    summary = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    done = "SANITIZE_BLOCKS_DONE" in text
    not_run = re.search(r"SANITIZE_BLOCKS_NOT_RUN: (.*)", text)
    refused = re.search(r"(Device not supported.*|Unable to find injection library.*|"
                        r"Target application terminated before first instrumented API call.*)", text)
    errors = int(summary[-1]) if summary else None
    if not_run:
        status = f"not run: {not_run.group(1).strip()}"
    elif refused and not done:
        status = f"not run: compute-sanitizer could not run here ({refused.group(1).strip()[:200]})"
    elif errors is None:
        status = f"not run: no ERROR SUMMARY in the output (exit status {rc})"
    elif errors > 0:
        status = "errors"
    elif done and rc == 0:
        status = "clean"
    else:
        status = f"not run: the program did not finish (exit status {rc}, completion marker {'seen' if done else 'missing'})"
    return {"tool": tool, "status": status, "errors": errors, "rc": rc, "completed": done,
            "log_tail": text[-3000:]}


def phase_status(rc: int) -> str:
    if rc == 0:
        return "ok"
    if rc in (124, 137):
        return "timeout"
    return "failed"


def one_line(record: dict) -> str:
    """``phase: status (seconds) details``."""
    head = f"{record['phase']}: {record['status']} ({record['seconds']:.0f} s, exit {record['rc']})"
    details = record.get("details") or {}
    result = record.get("result")
    phase = record["phase"]
    if phase == "build" and isinstance(result, dict):
        head += f" _C loads: {result.get('extension_loads')}; backends {result.get('available_backends')}"
    elif phase == "test" and details.get("junit"):
        j = details["junit"]
        head += (f" {j.get('passed')} passed, {j.get('failures')} failed, {j.get('errors')} errors, "
                 f"{j.get('skipped')} skipped")
    elif phase == "parity" and isinstance(result, dict) and "cases" in result:
        cases = result["cases"]
        counts = {s: sum(c.get("status") == s for c in cases) for s in ("pass", "fail", "error", "skipped", "unavailable")}
        head += (f" cases: {counts['pass']} pass, {counts['fail']} fail, {counts['error']} error, "
                 f"{counts['skipped']} skipped, {counts['unavailable']} unavailable; "
                 f"{json.dumps(result.get('summary'))}; complete={result.get('complete')}")
    elif phase == "tune" and isinstance(result, dict) and "entries" in result:
        head += (f" {len(result['entries'])} entries, {len(result.get('skipped', []))} skipped, "
                 f"device {result.get('device_name')!r}; complete={result.get('complete')}")
    elif phase in ("bench", "models") and isinstance(result, dict) and "rows" in result:
        rows = result["rows"]
        counts = {s: sum(r.get("status") == s for r in rows) for s in ("ok", "unavailable", "skipped", "error")}
        head += (f" rows: {counts['ok']} ok, {counts['error']} error, {counts['unavailable']} unavailable, "
                 f"{counts['skipped']} skipped; complete={result.get('complete')}")
    elif phase == "sanitize":
        tools = details.get("tools") or []
        head += " " + "; ".join(f"{t['tool']}: {t['status']}" + (f" ({t['errors']} errors)" if t.get("errors") else "")
                                for t in tools)
    if record.get("reason"):
        head += f" [{record['reason']}]"
    return head


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase", required=True)
    parser.add_argument("--out", required=True, help="folder of <phase>.json")
    parser.add_argument("--rc", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--command", default="")
    parser.add_argument("--log", default=None)
    parser.add_argument("--result", default=None, help="a JSON the phase produced, embedded as 'result'")
    parser.add_argument("--junit", default=None, help="a JUnit XML to summarise (test phase)")
    parser.add_argument("--sanitizer", action="append", default=[], metavar="TOOL=RC=LOG",
                        help="a compute-sanitizer run to summarise (sanitize phase)")
    parser.add_argument("--attach", action="append", default=[], metavar="NAME=PATH",
                        help="a file embedded under details.attachments.NAME (JSON parsed, text as its last "
                             f"{ATTACH_CHARS} characters); a missing file is skipped")
    parser.add_argument("--not-run", default=None, help="the phase did not run, and why")
    parser.add_argument("--dry-run", default="0", help="1: a CPU dry run of the flow (recorded)")
    args = parser.parse_args()

    record: dict[str, Any] = {
        "phase": args.phase,
        "status": phase_status(args.rc),
        "rc": args.rc,
        "seconds": round(args.seconds, 1),
        "schema": 1,
        "dry_run": args.dry_run == "1",
        "commit": os.environ.get("RESNET_FUSED_COMMIT", "unknown"),
        "recorded_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": args.command,
        "details": {},
        "result": load_json(args.result),
        "log_tail": read_tail(args.log),
    }
    for spec in args.attach:
        name, _, path = spec.partition("=")
        if path and os.path.exists(path):
            record["details"].setdefault("attachments", {})[name] = (
                load_json(path) if path.endswith(".json") else read_tail(path, ATTACH_CHARS))
    if args.junit:
        record["details"]["junit"] = junit_summary(args.junit)
        if record["details"]["junit"] is None:
            record["reason"] = "no JUnit XML was written (pytest did not get far enough)"
    if args.sanitizer:
        tools = []
        for spec in args.sanitizer:
            tool, rc, log = spec.split("=", 2)
            tools.append(sanitizer_summary(tool, log, int(rc)))
        record["details"]["tools"] = tools
        statuses = [t["status"] for t in tools]
        if any(s == "errors" for s in statuses):
            record["status"] = "errors"
        elif all(s == "clean" for s in statuses):
            record["status"] = "clean"
        else:
            record["status"] = next(s for s in statuses if s.startswith("not run"))
    if args.not_run:
        record["status"] = f"not run: {args.not_run}"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / f"{args.phase}.json", "w") as f:
        json.dump(record, f, indent=1, default=str)
    print(one_line(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
