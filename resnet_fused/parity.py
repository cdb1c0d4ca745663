"""The project's parity rule, one copy for the tests and the scripts (the GPU check's real-shape
parity, the tuning sweep).

A fused result passes when its relative error against a float64 reference is at most twice the
error eager PyTorch makes in the same dtype, plus two units of roundoff of the dtype:

    rel_err(fused, exact) <= 2 * max(rel_err(eager, exact), spread) + 2 * u(dtype)
    spread = min(eager_spread, 4 * rel_err(eager, exact))

``eager_spread`` is eager's largest error over a few rounding-noise copies of the same problem,
where one eager sample is not a fair measure of eager's accuracy; capped at 4x eager's error, so
no bound exceeds 8x eager's error + 2u. Layer 0: imports nothing of the package.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["UNIT_ROUNDOFF", "MAX_SPREAD_FACTOR", "rel_err", "tolerance", "bound", "check"]

#: Unit roundoff per dtype.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24,
                 torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
#: The ceiling on a widened bound: a spread counts at most this many times eager's own error.
MAX_SPREAD_FACTOR = 4.0


def rel_err(actual: torch.Tensor, expected: torch.Tensor, scale: float = 0.0) -> float:
    """||actual - expected|| / max(||expected||, scale) in float64; inf when ``actual`` has a NaN
    or an inf, or the shapes differ.

    ``scale``: the size of the quantity ``expected`` is a small remainder of, where it cancels by
    construction (a train-mode BN's dbeta)."""
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape or not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).norm() / max(e.norm().item(), scale, 1e-300)).item()


def tolerance(dtype: torch.dtype, eager_err: float) -> float:
    """2 x eager's error + 2 units of roundoff."""
    return 2.0 * eager_err + 2.0 * UNIT_ROUNDOFF[dtype]


def bound(dtype: torch.dtype, eager_err: float, eager_spread: float = 0.0) -> float:
    """The rule's bound on the fused error, the spread capped at MAX_SPREAD_FACTOR x eager's."""
    return tolerance(dtype, max(eager_err, min(eager_spread, MAX_SPREAD_FACTOR * eager_err)))


def check(fused: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype,
          eager_spread: float = 0.0, what: str = "") -> dict:
    """One comparison under the rule, as a JSON-ready dict (``ok``, the errors and the bound)."""
    err, eager_err = rel_err(fused, exact), rel_err(eager, exact)
    limit = bound(dtype, eager_err, eager_spread)
    return {"what": what, "ok": bool(err <= limit), "fused_err": _finite(err), "eager_err": _finite(eager_err),
            "eager_spread": _finite(eager_spread), "bound": _finite(limit),
            "ratio_to_eager": _finite(err / eager_err) if eager_err > 0 else None}


def _finite(value: float) -> Optional[float]:
    """JSON has no inf or NaN: None stands for them (and fails the check that produced it)."""
    if value != value or value in (float("inf"), float("-inf")):
        return None
    return float(f"{value:.4g}")
