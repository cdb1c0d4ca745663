"""What a benchmark writes: speedups, the run record (JSON), tables, plots, the closing summary."""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch


from benchmarks.environment import REPO_ROOT, environment, device_slug
from benchmarks.impls import Implementation
from benchmarks.timing import round_significant


# ---------------------------------------------------------------------------------------------
# Ratios, the run record, tables, plots
# ---------------------------------------------------------------------------------------------


def add_speedups(rows: list[dict], same_case: Sequence[str], value: str = "median_ms") -> None:
    """Add ``speedup_vs_eager`` and ``speedup_vs_compile`` (> 1: faster than that baseline) to
    every measured row, against the baseline row of the same case from the same run; ``value``
    is a time (lower is better)."""
    def case(row: dict) -> tuple:
        return tuple(row.get(k) for k in same_case)

    baselines: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row.get("status") == "ok" and row["impl"] in ("eager", "compile"):
            baselines.setdefault(case(row), {})[row["impl"]] = row[value]
    for row in rows:
        if row.get("status") != "ok":
            continue
        for baseline in ("eager", "compile"):
            reference = baselines.get(case(row), {}).get(baseline)
            speedup = None
            if reference:
                speedup = reference / row[value]
            row[f"speedup_vs_{baseline}"] = None if speedup is None else round_significant(speedup)


class RunRecord:
    """One run's JSON: what was asked, where it ran, what it measured. Written after every
    case (``complete`` false until the end), so a run cut short still leaves its rows."""

    def __init__(self, what: str, args: argparse.Namespace, device: torch.device,
                 conventions: dict[str, str]):
        self.data: dict[str, Any] = {
            "what": what,
            "schema": 1,
            "complete": False,
            "config": {k: v for k, v in vars(args).items()},
            "environment": environment(device),
            "conventions": conventions,
            "ceilings": None,
            "notes": [],
            "rows": [],
        }
        out_dir = Path(args.out) if args.out else Path(os.environ.get("OUT") or REPO_ROOT / "benchmarks" / "out")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = args.name or f"{stamp}_{device_slug(self.data['environment'])}_{what}"
        self.json_path = out_dir / f"{name}.json"
        self.png_path = out_dir / f"{name}.png"

    @property
    def rows(self) -> list[dict]:
        return self.data["rows"]

    def note(self, text: str) -> None:
        self.data["notes"].append(text)

    def write(self, complete: bool = False) -> Path:
        self.data["complete"] = complete
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.json_path)  # never leave a half-written JSON behind
        return self.json_path


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width table. ``columns``: (header, row key, format spec); missing values as "-"."""
    def cell(row: dict, key: str, spec: str) -> str:
        value = row.get(key)
        if value is None or value == "":
            return "-"
        if isinstance(value, (int, float)) and not isinstance(value, bool) and spec:
            return format(value, spec)
        return str(value)

    cells = [[cell(row, key, spec) for _, key, spec in columns] for row in rows]
    widths = [max([len(header)] + [len(r[i]) for r in cells]) for i, (header, _, _) in enumerate(columns)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip((c[0] for c in columns), widths)))]
    for r in cells:
        lines.append("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def geometric_mean(values: Iterable[float]) -> Optional[float]:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def plot_grouped_bars(panels: dict[str, dict[str, dict[str, float]]], path: Path, ylabel: str,
                      title: str, markers: Optional[dict[str, dict[str, float]]] = None,
                      log_y: bool = False) -> str:
    """One subplot per panel; in each, groups along x and one bar per series.

    ``panels[panel][group][series] = value``; ``markers[panel][group]`` draws a black tick
    across the group (the floor). Returns a note: where the PNG went, or why there is none.
    """
    if not panels:
        return "no plot: nothing was measured"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed"
    n = len(panels)
    fig, axes = plt.subplots(n, 1, figsize=(max(8.0, 1.1 * max(len(g) for g in panels.values()) + 3), 3.2 * n),
                             squeeze=False)
    for ax, (panel, groups) in zip(axes[:, 0], panels.items()):
        series = list(dict.fromkeys(s for values in groups.values() for s in values))
        width = 0.8 / max(len(series), 1)
        for i, name in enumerate(series):
            xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
            ys = [values.get(name, float("nan")) for values in groups.values()]
            ax.bar(xs, ys, width, label=name)
        for g, group in enumerate(groups):
            floor = (markers or {}).get(panel, {}).get(group)
            if floor:
                ax.hlines(floor, g - 0.45, g + 0.45, colors="black", linewidth=1.5,
                          label="floor" if g == 0 else None)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(list(groups), rotation=20, ha="right", fontsize=8)
        ax.set_title(panel, fontsize=10)
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=min(len(series) + 1, 6))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"PNG: {path}"



def summary_lines(rows: Sequence[dict], impls: Sequence[Implementation], group_key: str) -> list[str]:
    """The closing lines of a run: row counts, each implementation's geometric-mean speedup
    over eager per ``group_key`` value (e.g. per mode), and why rows were not measured."""
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "unavailable", "skipped", "error")}
    lines = [f"summary: {len(rows)} rows: {counts['ok']} measured, {counts['unavailable']} unavailable, "
             f"{counts['skipped']} skipped (budget), {counts['error']} errors"]
    groups = list(dict.fromkeys(r[group_key] for r in rows))
    for impl in impls:
        impl_rows = [r for r in rows if r["impl"] == impl.name]
        speedups = []
        for group in groups:
            g = geometric_mean(r.get("speedup_vs_eager") for r in impl_rows
                               if r[group_key] == group and r["status"] == "ok")
            if g is not None and impl.name != "eager":
                speedups.append(f"{group} {g:.3g}x")
        if speedups:
            lines.append(f"  {impl.name}: geometric-mean speedup vs eager: {', '.join(speedups)}")
        for status in ("unavailable", "error", "skipped"):
            reasons = sorted({r["reason"] for r in impl_rows if r["status"] == status})
            for reason in reasons[:3]:
                lines.append(f"  {impl.name}: {status}: {reason}")
            if len(reasons) > 3:
                lines.append(f"  {impl.name}: ... and {len(reasons) - 3} more {status} reasons in the JSON")
    return lines


def exit_code(rows: Sequence[dict]) -> int:
    """Non-zero when any case failed (unavailable implementations are not failures)."""
    return 1 if any(row.get("status") == "error" for row in rows) else 0
