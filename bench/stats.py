"""Statistics shared by the benchmark scripts.

`percentile` is the definition every percentile in bench/RESULTS.md was computed with: linear
interpolation between the two nearest ranks (numpy's default, "linear"), so p50 equals
`statistics.median`. The scripts run as `python bench/<script>.py`, which puts bench/ on sys.path:
`from stats import percentile`.
"""

from __future__ import annotations

from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) of `values`, linearly interpolated between the closest ranks
    (as numpy's default); None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
