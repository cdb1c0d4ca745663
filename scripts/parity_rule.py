"""The project's parity rule, for scripts (the GPU check's real-shape parity, the tuning sweep).

The rule is the test suite's (``tests/helpers.py``: ``rel_err``, ``tolerance``,
``assert_parity``): the fused result's relative error against a float64 reference may be at
most 2x the error eager PyTorch makes in the same dtype, plus two units of roundoff of the
dtype:

    rel_err(fused, exact) <= 2 * max(rel_err(eager, exact), spread) + 2 * u(dtype)
    spread = min(eager_spread, 4 * rel_err(eager, exact))

``eager_spread`` is eager's largest error over a few rounding-noise copies of the same problem
(``eager_error_spread`` in tests/helpers.py), where one eager sample is not a fair measure of
eager's accuracy; capped at 4x eager's error, so no bound exceeds 8x eager's error + 2u. The formula is copied here, not imported, so that scripts never import the
test package; tests/test_gpu_check.py checks that the two agree.
"""
from __future__ import annotations

from typing import Optional

import torch

#: Unit roundoff per dtype (tests/helpers.py: UNIT_ROUNDOFF).
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24,
                 torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


#: The ceiling on a widened bound (tests/helpers.py: MAX_SPREAD_FACTOR).
MAX_SPREAD_FACTOR = 4.0


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; inf when ``actual`` has a NaN or inf."""
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        return float("inf")
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def tolerance(dtype: torch.dtype, eager_err: float) -> float:
    """2 x eager's error + 2 units of roundoff (tests/helpers.py: tolerance)."""
    return 2.0 * eager_err + 2.0 * UNIT_ROUNDOFF[dtype]


def check(fused: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype,
          eager_spread: float = 0.0, what: str = "") -> dict:
    """One comparison under the rule, as a JSON-ready dict (``ok``, the errors and the bound)."""
    err, eager_err = rel_err(fused, exact), rel_err(eager, exact)
    bound = tolerance(dtype, max(eager_err, min(eager_spread, MAX_SPREAD_FACTOR * eager_err)))
    return {"what": what, "ok": bool(err <= bound), "fused_err": _finite(err), "eager_err": _finite(eager_err),
            "eager_spread": _finite(eager_spread), "bound": _finite(bound),
            "ratio_to_eager": _finite(err / eager_err) if eager_err > 0 else None}


def _finite(value: float) -> Optional[float]:
    """JSON has no inf or NaN: None stands for them (and fails the check that produced it)."""
    if value != value or value in (float("inf"), float("-inf")):
        return None
    return float(f"{value:.4g}")
