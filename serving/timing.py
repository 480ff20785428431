"""How every time measured here is reported: the median of the samples, with their spread and count."""

from __future__ import annotations

import statistics


def summary(samples: list[float]) -> dict:
    """``{"median", "min", "max", "n"}`` of timing samples."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}
