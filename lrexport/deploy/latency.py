"""Wall-clock latency of several runners on one input, measured side by side (DESIGN §6).

Calls are interleaved (a, b, a, b, …, the order alternating each round), so a slow
spell of the machine hits every model alike instead of whichever ran during it.
Torch-free: a runner is any callable taking a numpy batch.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np


@dataclass
class LatencyStats:
    batch: int
    repeats: int
    median_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    std_ms: float

    @property
    def images_per_s(self) -> float:
        return 1000.0 * self.batch / self.median_ms

    def to_dict(self) -> dict:
        return asdict(self) | {"images_per_s": self.images_per_s}

    @classmethod
    def from_ms(cls, batch: int, times_ms) -> "LatencyStats":
        ms = np.asarray(times_ms, dtype=np.float64)
        return cls(
            batch, len(ms), float(np.median(ms)), float(np.percentile(ms, 90)), float(ms.min()),
            float(ms.mean()), float(ms.std()),
        )


def time_rounds(
    runners: Mapping[str, Callable[[np.ndarray], object]], x: np.ndarray, warmup: int = 10, repeats: int = 50
) -> dict[str, list[float]]:
    """Milliseconds of each call, per runner; entry i of every list comes from the same round."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats ≥ 1 and warmup ≥ 0; got {repeats}, {warmup}")
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name](x)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            start = time.perf_counter()
            runners[name](x)
            times[name].append(1000.0 * (time.perf_counter() - start))
    return times


def measure(
    runners: Mapping[str, Callable[[np.ndarray], object]], x: np.ndarray, warmup: int = 10, repeats: int = 50
) -> dict[str, LatencyStats]:
    """Median, p90 and spread of each runner's latency on ``x``, after ``warmup`` calls each."""
    times = time_rounds(runners, x, warmup, repeats)
    return {name: LatencyStats.from_ms(len(x), t) for name, t in times.items()}
