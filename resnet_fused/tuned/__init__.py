"""Measured launch choices per GPU: the tables ``scripts/gpu_check.sh tune`` writes, read at run time.

Each ``<device>.json`` in this folder (``NVIDIA-H200.json``, ...) is one GPU's table, written by
``scripts/gpu_tune.py`` on that GPU and committed as data. Nothing here is typed by hand. The
Triton launch-configuration selector (``resnet_fused.triton.configs``) asks this module first;
where the table has no entry for the device, dtype and GEMM shape, today's heuristics answer.

Entries (``"entries"`` of a table), all keyed by ``dtype`` (``"bfloat16"``, ``"float16"``,
``"float32"``) and the GEMM shape of one conv (``m`` rows, ``n`` columns per group, ``k``
reduction per group, ``ksize`` 1 or 3; the forward conv's, for its dgrad and wgrad entries too, as
``configs.conv_config`` receives them):

* ``direction`` ``"forward"`` / ``"dgrad"`` / ``"wgrad"`` with ``"config"``: the fastest tile
  config among the candidates that computed the right result, for that direction;
* ``direction`` ``"backward"`` with no shape: the backward tile config with the least total time
  over every backward shape measured (what ``backward_config`` returns when its caller passes no
  shape);
* ``direction`` ``"strategy3x3"`` with ``"strategy"``: ``fused`` or ``hybrid`` for a 3x3 with a
  BN+ReLU prologue, measured on the whole block (train forward + backward).

A lookup matches ``ksize``, ``n`` and ``k`` exactly and takes the entry with the nearest ``m``
within a factor of :data:`M_FACTOR` (the batch changes ``m``; the tile that wins at batch 256
is a fair guess at batch 128, not at batch 2). ``AUTO_CUDA_TABLE`` (``auto_cuda_table.json``,
derived from a quick run by ``scripts/derive_auto_table.py``) lives here too.

``RESNET_FUSED_TUNED=0`` switches the tables off for a process; ``RESNET_FUSED_TUNED_DIR``
(a folder) replaces this folder as the source (tests, or a table not yet committed).
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["AUTO_TABLE_FILE", "M_FACTOR", "SCHEMA", "auto_cuda_table", "conv_entry", "device_slug",
           "enabled", "load_tables", "reload", "strategy_entry", "table_dir"]

#: Format version of a tuned table (``schema`` in the file); a table of another version is ignored.
SCHEMA = 1
#: How far the ``m`` of a lookup may be from a table entry's (either way) for the entry to apply.
M_FACTOR = 4.0
#: The file of backend choices for ``auto`` (see ``resnet_fused.backends``).
AUTO_TABLE_FILE = "auto_cuda_table.json"
DIRECTIONS = ("forward", "dgrad", "wgrad", "backward", "strategy3x3")

def device_slug(name: str) -> str:
    """A file-name-safe device name: "NVIDIA H200" -> "NVIDIA-H200" (the table's file name)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "device"


def table_dir() -> Path:
    override = os.environ.get("RESNET_FUSED_TUNED_DIR", "").strip()
    return Path(override) if override else Path(__file__).resolve().parent


def enabled() -> bool:
    return os.environ.get("RESNET_FUSED_TUNED", "1").strip() not in ("0", "false", "no", "off")


def _valid_table(data: Any) -> bool:
    return (isinstance(data, dict) and data.get("schema") == SCHEMA and isinstance(data.get("device_name"), str)
            and isinstance(data.get("entries"), list))


@functools.lru_cache(maxsize=None)
def _load(folder: str) -> dict[str, dict]:
    """device name -> table, from every ``*.json`` table in ``folder`` (unreadable files skipped)."""
    tables: dict[str, dict] = {}
    path = Path(folder)
    if not path.is_dir():
        return tables
    for file in sorted(path.glob("*.json")):
        if file.name == AUTO_TABLE_FILE:
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        if _valid_table(data):
            tables[data["device_name"]] = data
    return tables


def load_tables() -> dict[str, dict]:
    """Every tuned table of :func:`table_dir`, by device name (empty when switched off)."""
    if not enabled():
        return {}
    return _load(str(table_dir()))


def reload() -> None:
    """Forget the cached tables (after a table file or RESNET_FUSED_TUNED_DIR changed)."""
    _load.cache_clear()
    for cached in (_device_name, auto_cuda_table):
        if hasattr(cached, "cache_clear"):  # a test may have replaced one with a plain function
            cached.cache_clear()


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _name_of(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_name(index)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _nearest(entries: list[dict], m: Optional[int]) -> Optional[dict]:
    if not entries:
        return None
    if m is None or m <= 0:
        return None
    best, best_distance = None, math.inf
    for entry in entries:
        em = entry.get("m")
        if not isinstance(em, int) or em <= 0:
            continue
        distance = abs(math.log(m / em))
        if distance < best_distance:
            best, best_distance = entry, distance
    if best is None or best_distance > math.log(M_FACTOR):
        return None
    return best


def _entries(device_name: Optional[str], dtype: torch.dtype, direction: str) -> list[dict]:
    if device_name is None:
        return []
    table = load_tables().get(device_name)
    if table is None:
        return []
    dtype_name = _dtype_name(dtype)
    return [e for e in table["entries"] if isinstance(e, dict) and e.get("direction") == direction
            and e.get("dtype") == dtype_name]


def lookup(device_name: Optional[str], dtype: torch.dtype, direction: str, *, ksize: Optional[int] = None,
           m: Optional[int] = None, n: Optional[int] = None, k: Optional[int] = None) -> Optional[dict]:
    """The table entry for this device name, dtype, direction and shape, or None.

    ``direction="backward"`` takes no shape (the table's one backward default per dtype).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    entries = _entries(device_name, dtype, direction)
    if direction == "backward":
        return entries[0] if entries else None
    same = [e for e in entries if e.get("n") == n and e.get("k") == k
            and (direction == "strategy3x3" or e.get("ksize") == ksize)]
    return _nearest(same, m)


def conv_entry(device: torch.device, dtype: torch.dtype, direction: str, *, ksize: Optional[int] = None,
               m: Optional[int] = None, n: Optional[int] = None, k: Optional[int] = None) -> Optional[dict]:
    """The tuned tile config (a dict of the config's fields) for a conv on ``device``, or None."""
    entry = lookup(_name_of(device), dtype, direction, ksize=ksize, m=m, n=n, k=k)
    config = entry.get("config") if entry else None
    return config if isinstance(config, dict) else None


def strategy_entry(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int) -> Optional[str]:
    """The tuned 3x3 strategy (``fused`` / ``hybrid``) for this device, dtype and shape, or None."""
    entry = lookup(_name_of(device), dtype, "strategy3x3", m=m, n=n, k=k)
    strategy = entry.get("strategy") if entry else None
    return strategy if strategy in ("fused", "hybrid") else None


@functools.lru_cache(maxsize=None)
def auto_cuda_table() -> dict[tuple[str, str, str], bool]:
    """``AUTO_CUDA_TABLE`` from ``auto_cuda_table.json`` (this package's folder, never the
    override): {(capability, dtype, block family): True} where the cuda backend won."""
    path = Path(__file__).resolve().parent / AUTO_TABLE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    table: dict[tuple[str, str, str], bool] = {}
    for entry in data.get("entries", []) if isinstance(data, dict) else []:
        try:
            key = (str(entry["capability"]), str(entry["dtype"]), str(entry["block"]))
        except (KeyError, TypeError):
            continue
        if entry.get("cuda_wins") is True:
            table[key] = True
    return table
