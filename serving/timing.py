"""How every time measured here is taken and reported.

- Warm-up runs first and is thrown away (a fresh engine's first requests, a kernel's first launch).
- At least ``MIN_SAMPLES`` samples, more where they are cheap, until ``min_seconds`` have been spent.
- Side-by-side runs are interleaved, A, B, A, B …: a burst of load on the machine hits both.
- A figure is the median with its quartiles, extremes and sample count (``summary``); a ratio of two
  interleaved runs is the median of the paired ratios with a distribution-free confidence interval (``ratio``).
- ``noise`` says why a figure is not to be trusted: its spread, or the cores it ran on being shared
  (``serving.machine_load``).

Pure Python (no torch): the vLLM environment and the GPU suite use it too.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

MIN_SAMPLES = 5
NOISY_SPREAD = 0.10  # interquartile range over the median above which a figure is marked noisy


def quartiles(samples: list[float]) -> tuple[float, float, float]:
    """``(q1, median, q3)`` by linear interpolation between order statistics (numpy's default): with 5 samples
    ``q1`` is the second smallest and ``q3`` the second largest."""
    ordered = sorted(samples)

    def at(p: float) -> float:
        position = p * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return at(0.25), at(0.5), at(0.75)


def summary(samples: list[float]) -> dict:
    """``{"median", "q1", "q3", "min", "max", "n", "spread"}`` of timing samples; ``spread`` is the interquartile
    range relative to the median (0.1: the middle half of the samples lies within 10 % of the median's size)."""
    q1, median, q3 = quartiles(samples)
    return {
        "median": median,
        "q1": q1,
        "q3": q3,
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
        "spread": (q3 - q1) / abs(median) if median else math.inf,
    }


def sample_interleaved(
    runs: dict[str, Callable[[], float]],
    warmup: int = 1,
    min_samples: int = MIN_SAMPLES,
    min_seconds: float = 0.0,
    max_samples: int = 1000,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Samples of each run, interleaved: every round calls each run once, in the order given (A, B, A, B …), so
    the k-th samples of A and B were taken side by side. Each run returns one sample (it times itself: a CUDA
    event, a wall clock, a server's own timestamps). ``warmup`` rounds go first and are discarded; then rounds
    until there are ``min_samples`` and ``min_seconds`` have passed (``max_samples`` at most)."""
    if min_samples < 1 or max_samples < min_samples:
        raise ValueError(f"need 1 <= min_samples <= max_samples, got {min_samples} and {max_samples}")
    for _ in range(warmup):
        for run in runs.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    started = clock()
    while True:
        for name, run in runs.items():
            samples[name].append(run())
        taken, elapsed = len(next(iter(samples.values()))), clock() - started
        if taken >= max_samples or (taken >= min_samples and elapsed >= min_seconds):
            return samples


def sign_interval(n: int, confidence: float = 0.95) -> tuple[int, float]:
    """The order statistics ``(k, achieved confidence)`` whose ``[x_(k), x_(n+1-k)]`` (1-based, sorted) covers the
    median of any continuous distribution with probability ``1 - 2·P(Binomial(n, ½) < k)``: the largest ``k`` that
    reaches ``confidence``, else ``k = 1`` (min–max; with 5 samples it covers 93.75 %)."""

    def covers(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, j) for j in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and covers(k + 1) >= confidence:
        k += 1
    return k, covers(k)


def ratio(numerator: list[float], denominator: list[float], confidence: float = 0.95) -> dict:
    """The ratio of two interleaved runs: per round ``numerator[i] / denominator[i]`` (samples taken side by
    side), its median and the sign-test interval of that median (``sign_interval``). ``{"median", "low",
    "high", "confidence", "n"}``."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"a ratio needs paired samples: got {len(numerator)} and {len(denominator)}")
    paired = sorted(a / b for a, b in zip(numerator, denominator))
    k, achieved = sign_interval(len(paired), confidence)
    return {
        "median": statistics.median(paired),
        "low": paired[k - 1],
        "high": paired[len(paired) - k],
        "confidence": achieved,
        "n": len(paired),
    }


def noise(result: dict, load: dict | None = None, max_spread: float = NOISY_SPREAD) -> list[str]:
    """Why ``result`` (a ``summary``) is not to be trusted, one reason a line; empty where it is. ``load`` is the
    machine's load while it was timed (``serving.machine_load.load_between``)."""
    reasons = []
    if result.get("n", 0) < MIN_SAMPLES:
        reasons.append(f"only {result.get('n', 0)} samples (fewer than {MIN_SAMPLES})")
    spread = result.get("spread")
    if spread is not None and spread > max_spread:
        reasons.append(f"spread {spread:.0%} of the median (interquartile range; above {max_spread:.0%})")
    if load and load.get("shared"):
        reasons.append(load["why_shared"])
    return reasons


def verdict(speedup: dict, reasons: list[str]) -> str:
    """What a speedup (a ``ratio``, above 1 where the candidate is faster) says: ``"not judged"`` where there are
    reasons not to trust it (``noise``), ``"faster"`` / ``"slower"`` where its interval lies above / below 1,
    else ``"no difference"`` (the interval holds 1)."""
    if reasons:
        return "not judged"
    if speedup["low"] > 1:
        return "faster"
    if speedup["high"] < 1:
        return "slower"
    return "no difference"
