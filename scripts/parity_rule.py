"""The project's parity rule for the scripts: ``resnet_fused.parity`` (the one copy, which the
test suite's ``tests/helpers.py`` uses too), under the name the scripts import."""
from __future__ import annotations

from resnet_fused.parity import MAX_SPREAD_FACTOR, UNIT_ROUNDOFF, bound, check, rel_err, tolerance  # noqa: F401
