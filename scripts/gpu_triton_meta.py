"""The Triton kernels compiled on this machine, from Triton's cache: name, warps, stages, shared
memory (Triton's own metadata), registers, stack and spills (``resnet_fused.triton.aot``'s
``resource_usage`` on each cubin), and when each was written (the spread of the write times
bounds the compile time).

    python scripts/gpu_triton_meta.py --out triton_meta.json [--cache-dir DIR]

Standard library + the package's aot helpers; a kernel the tools cannot read is recorded with
the reason. An empty cache (the dry run's interpreter compiles nothing) gives an empty list.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from resnet_fused.triton import aot  # noqa: E402


def cache_dir(explicit: str | None) -> str:
    return explicit or os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")


def kernel_record(meta_path: str) -> dict | None:
    try:
        meta = json.loads(Path(meta_path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or "name" not in meta or "shared" not in meta:
        return None  # a group file or another tool's entry
    folder = os.path.dirname(meta_path)
    stem = os.path.join(folder, meta["name"])
    target = meta.get("target") or {}
    record = {"name": meta["name"], "num_warps": meta.get("num_warps"), "num_stages": meta.get("num_stages"),
              "shared_bytes": meta.get("shared"), "arch": target.get("arch"),
              "written_unix": round(os.path.getmtime(meta_path), 2)}
    try:
        cubin = Path(stem + ".cubin").read_bytes()
        ptx = Path(stem + ".ptx").read_text()
        record.update(aot.resource_usage(cubin, ptx, int(target.get("arch") or 90)))
    except (OSError, ValueError, FileNotFoundError) as exc:
        record["usage_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    folder = cache_dir(args.cache_dir)
    paths = sorted(glob.glob(os.path.join(folder, "*", "*.json")))
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        records = [r for r in pool.map(kernel_record, paths) if r is not None]
    records.sort(key=lambda r: r["written_unix"])
    times = [r["written_unix"] for r in records]
    result = {"what": "triton compile metadata", "cache_dir": folder, "kernels": len(records),
              "written_span_s": round(times[-1] - times[0], 1) if times else 0.0,
              "max_shared_bytes": max((r["shared_bytes"] or 0 for r in records), default=0),
              "max_spill_stores": max((r.get("spill_stores") or 0 for r in records), default=0),
              "records": records}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"triton metadata: {len(records)} kernels in {folder}, max shared {result['max_shared_bytes']} B, "
          f"max spill stores {result['max_spill_stores']} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
