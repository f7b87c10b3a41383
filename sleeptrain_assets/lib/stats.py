"""Intervals for pass rates and target verdicts that say when n is too small to be sure.

The Wilson score interval is used rather than the normal approximation because SleepTrain's rates sit near
0 and 1 on a few dozen items, where the normal interval runs past [0, 1] and is far too narrow (10/10 would
be "100% +- 0"); Wilson's stays inside [0, 1] and keeps a sensible width at the edges.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

Z95 = 1.959964  # two-sided 95%


def wilson_interval(passed: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval (low, high) of `passed` successes in `n` trials; None when n is 0."""
    if n < 0 or passed < 0 or passed > n:
        raise ValueError(f"wilson_interval: need 0 <= passed <= n, got passed={passed}, n={n}")
    if n == 0:
        return None
    p = passed / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At p = 0 or 1 one bound is exactly 0 or 1 in exact arithmetic; floating point lands a hair inside.
    low = 0.0 if passed == 0 else max(0.0, centre - half)
    high = 1.0 if passed == n else min(1.0, centre + half)
    return low, high


MET = "met"
MET_UNSURE = "met, not yet sure"
NOT_MET = "not met"
NOT_MET_UNSURE = "not met, not yet sure"


def target_verdict(rate: Mapping[str, Any] | None, goal: float) -> str:
    """`met` / `met, not yet sure` / `not met` / `not met, not yet sure` for a rate dict against `goal`.

    Met means the measured rate is at or above the goal. "not yet sure" means the 95% interval still reaches
    the other side of the goal, so more items could flip the verdict. A rate with nothing measured (n = 0 or
    no rate) is "not met". `rate` is a `Rate.to_dict()`-shaped mapping: `rate`, and `ci_low`/`ci_high`
    (computed from `passed` and `n`/`count` when absent).
    """
    value = (rate or {}).get("rate")
    if value is None:
        return NOT_MET
    low, high = (rate or {}).get("ci_low"), (rate or {}).get("ci_high")
    if low is None or high is None:
        n = int((rate or {}).get("n", (rate or {}).get("count")) or 0)
        interval = wilson_interval(int((rate or {}).get("passed") or 0), n) if n else None
        low, high = interval if interval else (value, value)
    if value >= goal:
        return MET_UNSURE if low < goal else MET
    return NOT_MET_UNSURE if high >= goal else NOT_MET
