"""Files what a GPU quick run brought back: the results folder, the tuned table, AUTO_CUDA_TABLE
and README.md's Results section.

    python scripts/file_gpu_results.py OUT_DIR                   # then review and commit
    python scripts/file_gpu_results.py OUT_DIR --results-dir D --tuned-dir T --readme R --auto-table A

1. copies the run's files (the records scripts/gpu_check.sh leaves in $OUT) into
   ``benchmarks/results/<date>_<device>_quick/`` (date: the records' UTC date, YYYYMMDD; device:
   the GPU's name made file-name safe), refusing to overwrite an existing folder (``--force``);
2. writes ``tuned.json``, when the run has one, where the package reads it:
   ``resnet_fused/tuned/<device_slug>.json``;
3. reruns scripts/derive_auto_table.py (``AUTO_CUDA_TABLE``) and scripts/readme_results.py (the
   README section) over every run under the results folder.

Standard library only. Exit status 0 when everything was written, 2 for a bad OUT_DIR.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import derive_auto_table  # noqa: E402
import gpu_check_verify  # noqa: E402
import readme_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "device"


def run_identity(out: Path) -> tuple[str, str, bool]:
    """(date YYYYMMDD, device name, dry run) from the run's records."""
    date, device, dry = None, None, False
    for name in ("build.json", "parity.json", "bench.json", "models.json"):
        path = out / name
        if not path.exists():
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        dry = dry or bool(record.get("dry_run"))
        stamp = record.get("recorded_utc") or ""
        date = date or (stamp[:10].replace("-", "") if stamp else None)
        result = record.get("result") or {}
        device = device or result.get("device") or (result.get("environment") or {}).get("device_name")
    if dry:
        device = f"{device or 'cpu'}-dry-run"
    return date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d"), device or "unknown-device", dry


def file_results(out: Path, results_dir: Path, tuned_dir: Path, readme: Path, auto_table: Path,
                 force: bool = False) -> Path:
    names = sorted(p.name for p in out.iterdir() if p.is_file() and p.name in gpu_check_verify.ALLOWED)
    if not any(n.endswith(".json") for n in names):
        raise SystemExit(f"file_gpu_results: {out} holds no gpu_check record (expected some of "
                         f"{', '.join(sorted(gpu_check_verify.ALLOWED))})")
    date, device, _ = run_identity(out)
    folder = results_dir / f"{date}_{slug(device)}_quick"
    if folder.exists() and not force:
        raise SystemExit(f"file_gpu_results: {folder} exists (--force to overwrite)")
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(out / name, folder / name)
    print(f"filed {len(names)} files into {folder}")
    tuned = out / "tuned.json"
    if tuned.exists():
        table = json.loads(tuned.read_text())
        target = tuned_dir / f"{table['device_slug']}.json"
        tuned_dir.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(table, indent=1) + "\n")
        print(f"tuned table: {target}")
    runs = derive_auto_table.run_dirs(results_dir)
    derive_auto_table.main([*map(str, runs), "--out", str(auto_table)])
    readme_results.main([*map(str, runs), "--readme", str(readme)])
    return folder


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the folder the GPU run's files came back into")
    parser.add_argument("--results-dir", type=Path, default=derive_auto_table.RESULTS)
    parser.add_argument("--tuned-dir", type=Path, default=ROOT / "resnet_fused" / "tuned")
    parser.add_argument("--readme", type=Path, default=readme_results.README)
    parser.add_argument("--auto-table", type=Path, default=derive_auto_table.DEFAULT_OUT)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        print(f"file_gpu_results: {args.out} is not a folder", file=sys.stderr)
        return 2
    file_results(args.out, args.results_dir, args.tuned_dir, args.readme, args.auto_table, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
